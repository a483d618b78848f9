"""What every op shares, driven by the one registry of ops (meta_kernels.ops.OPS): opcheck of
every kernel in every namespace (schema, fake kernel, autograd registration, AOT dispatch), the
Triton schemas equal to the compiled ones, torch.compile(fullgraph=True) over the ops, the
backend choice, the self-check, and the layout rules (a test file per op; triton/ never imports
ops/)."""
import ast
import pathlib

import pytest
import torch

import meta_kernels as mk
from meta_kernels.ops import OPS, _backend, _registry
from tests.conftest import HAS_CUDA

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _opcheck_params():
    params = []
    for op in OPS.values():
        for backend, device in (("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")):
            if backend == "triton" and op.triton_module is None or backend in ("cpp", "cuda") and backend not in op.backends:
                continue
            skip = (device == "cuda" and not HAS_CUDA) or (backend == "triton" and device == "cpu" and HAS_CUDA)
            marks = [pytest.mark.skip(reason="needs a CUDA GPU / the Triton interpreter")] if skip else []
            params.append(pytest.param(op.name, backend, device, id=f"{op.name}-{backend}-{device}", marks=marks))
    return params


@pytest.mark.parametrize("op,backend,device", _opcheck_params())
def test_opcheck(op, backend, device):
    ok, why = _backend.available(backend, torch.device(device))
    assert ok, why
    ns = _registry.namespace(backend)
    cases = OPS[op].opcheck_cases(device)
    assert {name for name, _ in cases} == {k.name for k in OPS[op].kernels}, "every kernel has an opcheck case"
    for name, args in cases:
        torch.library.opcheck(getattr(ns, name).default, args)


def test_triton_schemas_equal_the_compiled_ones():
    """csrc/ops.cpp holds the schemas; the Triton namespace is defined from the registry's copy."""
    _registry.register_triton()
    for op in OPS.values():
        for kernel in op.kernels:
            compiled = str(getattr(torch.ops.meta_kernels, kernel.name).default._schema)
            assert compiled == f"meta_kernels::{kernel.name}{kernel.schema}"
            if op.triton_module is not None:
                triton = str(getattr(torch.ops.meta_kernels_triton, kernel.name).default._schema)
                assert triton == f"meta_kernels_triton::{kernel.name}{kernel.schema}"


def test_every_compiled_op_is_registered():
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    defined = {line.split('m.def("', 1)[1].split("(", 1)[0] for line in text.splitlines() if 'm.def("' in line}
    assert defined == {k.name for k in _registry.kernels()}


def test_every_op_has_its_files():
    for op in OPS.values():
        assert (ROOT / "meta_kernels" / "ops" / f"{op.name}.py").is_file()
        assert (ROOT / "tests" / "ops" / f"test_{op.name}.py").is_file()
        assert (ROOT / "csrc" / "cpu" / f"{op.name}.cpp").is_file()
        if "cuda" in op.backends:
            assert (ROOT / "csrc" / "cuda" / f"{op.name}.cu").is_file()
        if op.triton_module is not None:
            assert (ROOT / "meta_kernels" / "triton" / f"{op.triton_module}.py").is_file()


def test_triton_kernels_never_import_ops():
    for path in (ROOT / "meta_kernels" / "triton").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("meta_kernels.ops") for n in names), f"{path.name} imports {names}"


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_selfcheck_passes_for_every_op(backend):
    if backend == "triton" and HAS_CUDA:
        pytest.skip("CPU check; the GPU check covers triton on CUDA")
    for op in OPS.values():
        if backend in op.backends:
            op.selfcheck(backend)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_compile_fullgraph_matches_eager(backend):
    """Clip + step + batch norm + reptile under torch.compile(fullgraph=True), values and grads."""
    if backend == "triton" and HAS_CUDA:
        pytest.skip("CPU compile test; the GPU check covers triton on CUDA")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).requires_grad_()
    params, grads, lrs = [rnd(4, 3), rnd(4, 5, 2)], [rnd(4, 3), rnd(4, 5, 2)], torch.rand(2, generator=g).requires_grad_()
    x, w, b = rnd(4, 3, 2, 5, 5), rnd(4, 2), rnd(4, 2)

    def step(params, grads, lrs, x, w, b):
        _, factor = mk.clip_grad_norm(grads, 1.0, backend=backend)
        new = mk.sgd_step(params, grads, lrs, factor, backend=backend)
        y = mk.batch_norm(x, w, b, backend=backend)
        return sum(t.pow(2).sum() for t in new) + y.pow(3).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    eager_loss = step(params, grads, lrs, x, w, b)
    eager_grads = torch.autograd.grad(eager_loss, [*params, *grads, lrs, x, w, b])
    comp_loss = compiled(params, grads, lrs, x, w, b)
    comp_grads = torch.autograd.grad(comp_loss, [*params, *grads, lrs, x, w, b])
    torch.testing.assert_close(comp_loss, eager_loss)
    for e, c in zip(eager_grads, comp_grads):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)

    theta = [torch.randn(3), torch.randn(5, 2)]
    phi = [torch.randn(4, 3), torch.randn(4, 5, 2)]
    expected = [t.clone() for t in theta]
    mk.reptile_update_(expected, phi, 0.5, backend=backend)
    torch.compile(lambda th, ph: mk.reptile_update_(th, ph, 0.5, backend=backend), fullgraph=True)(theta, phi)
    for t, e in zip(theta, expected):
        torch.testing.assert_close(t, e)


def test_auto_picks_cpp_on_cpu():
    assert mk.backend_info()["auto"]["cpu"] == "cpp"


def test_unknown_backend_and_unusable_backend():
    p = [torch.randn(3, 4), torch.randn(3, 2, 3)]
    g = [torch.randn_like(t) for t in p]
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        mk.sgd_step(p, g, 0.1, backend="fast")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not usable here"):
        mk.sgd_step(p, g, 0.1, backend="cuda")
