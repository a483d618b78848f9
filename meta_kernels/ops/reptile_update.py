"""reptile_update_: theta_i += epsilon * (mean over tasks of adapted_i - theta_i), in place and
fused over a list of tensors. Checks, fake kernel and the front-end (no autograd: it builds no
graph); kernels in csrc/cpu/reptile_update.cpp, csrc/cuda/reptile_update.cu and
meta_kernels/triton/reptile_update.py."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from meta_kernels.ops import _backend, _checks, _registry, reference


def check_args(params, adapted) -> None:
    _checks.uniform_list(params, "params")
    if len(adapted) != len(params):
        raise ValueError(f"adapted has {len(adapted)} tensors but params has {len(params)}; pass one per tensor")
    T = _checks.leading_tasks(adapted, "adapted")
    if T < 1:
        raise ValueError("adapted must hold at least one task in dim 0")
    for i, (p, a) in enumerate(zip(params, adapted)):
        if a.shape[1:] != p.shape:
            raise ValueError(f"adapted[{i}] has shape {list(a.shape)} but must be [T, *params[{i}].shape] = [T, {list(p.shape)}]")
        if a.dtype != p.dtype or a.device != p.device:
            raise ValueError(f"adapted[{i}] must match params[{i}] in dtype and device")


def _fake(params, adapted, epsilon):
    check_args(params, adapted)


def reptile_update_(params: Sequence[Tensor], adapted: Sequence[Tensor], epsilon: float, *,
                    backend: str | None = None) -> None:
    """params_i += epsilon * (mean over tasks of adapted_i - params_i), in place, fused over the list.

    adapted_i is [T, *params_i.shape] (the adapted weights of T tasks)."""
    params, adapted = _checks.non_empty(params, "params"), list(adapted)
    _checks.no_graph_for_in_place(params, "reptile_update_")
    # Outside (0, 1] the step moves away from the tasks' mean or past it.
    epsilon = _checks.scalar(epsilon, "epsilon", "finite and in (0, 1]", lambda v: 0 < v <= 1)
    name = _backend.resolve(backend, params[0].device)
    op = reference.reptile_update_ if name == "reference" else _registry.namespace(name).reptile_update_
    _checks.checked_call(name, lambda: check_args(params, adapted), lambda: op(params, adapted, epsilon))


def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)
    return [("reptile_update_", ([rnd(3), rnd(5, 2)], [rnd(4, 3), rnd(4, 5, 2)], 0.5))]


def _selfcheck(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    theta, phi = [rnd(5, 7), rnd(1027)], [rnd(3, 5, 7), rnd(3, 1027)]
    expected = [t.clone() for t in theta]
    reference.reptile_update_(expected, phi, 0.3)
    reptile_update_(theta, phi, 0.3, backend=backend)
    torch.testing.assert_close(theta, expected)


OP = _registry.add(_registry.OpDef(
    name="reptile_update",
    kernels=(_registry.Kernel("reptile_update_", "(Tensor(a!)[] params, Tensor[] adapted, float epsilon) -> ()", _fake),),
    backends=_backend.CONCRETE, opcheck_cases=_opcheck_cases, selfcheck=_selfcheck, triton_module="reptile_update"))
