"""Backend choice: per call, per context, by environment variable; `auto`; the report; and the
reference fallback when the compiled library cannot be loaded."""
import json
import os
import subprocess
import sys

import pytest
import torch

import meta_kernels as mk
from meta_kernels.ops import _backend


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_context_manager_and_per_call_override(monkeypatch):
    calls = []
    monkeypatch.setattr("meta_kernels.ops.reference.sgd_step",
                        lambda *a: calls.append("reference") or [a[0][0].clone()])
    p, g = [torch.ones(2)], [torch.ones(2)]
    assert mk.current_backend() == "auto"
    with mk.use_backend("reference"):
        assert mk.current_backend() == "reference"
        mk.sgd_step(p, g, 0.1)
        mk.sgd_step(p, g, 0.1, backend="cpp")  # per call wins over the context
    assert mk.current_backend() == "auto"
    assert calls == ["reference"]
    with pytest.raises(ValueError, match="unknown backend 'nope' from use_backend"):
        with mk.use_backend("nope"):
            pass


def test_environment_variable_sets_the_default():
    out = _run("import meta_kernels as mk; print(mk.current_backend())", META_KERNELS_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    bad = _run("import meta_kernels", META_KERNELS_BACKEND="gpu-please")
    assert bad.returncode != 0 and "unknown backend 'gpu-please' from $META_KERNELS_BACKEND" in bad.stderr


def test_backend_info_reports_build_and_auto():
    info = mk.backend_info()
    assert info["extension"]["cpu"] is True and info["extension"]["openmp"] is True
    assert info["extension"]["torch_version_built"] == torch.__version__.split("+")[0]
    assert info["auto"]["cpu"] == "cpp"
    json.dumps(info)  # plain data, printable by the CLI


def test_missing_compiled_library_falls_back_with_one_warning():
    code = (
        "import sys, warnings\n"
        "sys.modules['meta_kernels._C'] = None  # as if the extension was never built\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import meta_kernels as mk, torch\n"
        "    out = mk.sgd_step([torch.ones(3)], [torch.ones(3)], 0.5)\n"
        "print(len([x for x in w if 'meta_kernels._C' in str(x.message)]), mk.backend_info()['auto']['cpu'], "
        "out[0].tolist())\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["1", "reference"]
    assert "[0.5, 0.5, 0.5]" in out.stdout


def test_cpp_backend_unusable_on_other_devices():
    ok, why = _backend.available("cpp", torch.device("meta"))
    assert not ok and "CPU tensors" in why
