"""Implicit MAML (Rajeswaran et al. 2019): the meta-gradient without unrolling the inner loop.

Each task's inner loop minimises L_support(phi) + lambda / 2 * |phi - theta|^2 from phi = theta
with no graph at all (memory does not grow with the inner steps). At its solution phi*,
d phi* / d theta = (I + H / lambda)^-1 with H the Hessian of L_support at phi*, so the task's
meta-gradient is v solving (I + H / lambda) v = grad L_query(phi*), found by conjugate gradient.
That needs H > -lambda; a few-shot conv net's support Hessian is far from it, so the solve adds a
damping to lambda (MAMLConfig.imaml_damping), as the official implementation does.
The Hessian-vector products of all T tasks are one batched double backward through the
task-batching engine (one graph of the support loss at phi*), the CG scalars per task.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from meta_kernels.meta.inner_common import InnerLoopSettings, per_task_loss
from meta_kernels.tensor_utils import task_view

_TINY = 1e-30  # guards 0 / 0 once a task's residual is exactly 0


def task_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Per-task inner product over lists of [T, *shape] tensors: [T]."""
    return sum((x * y).reshape(x.shape[0], -1).sum(1) for x, y in zip(a, b))


def conjugate_gradient(apply_a: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], steps: int) -> list[Tensor]:
    """x with A x = b for every task at once (A symmetric positive definite per task, applied by
    apply_a to lists of [T, *shape] tensors), after `steps` CG iterations from x = 0. Where A is not
    positive definite along a search direction, that task's iteration stops where it is."""
    x = [torch.zeros_like(v) for v in b]
    r = [v.clone() for v in b]
    p = [v.clone() for v in b]
    rs = task_dot(r, r)
    for _ in range(steps):
        ap = apply_a(p)
        curvature = task_dot(p, ap)
        # A task whose system is solved (p = 0) or not positive definite along p (a loss whose
        # Hessian has eigenvalues below -lambda) keeps its current solution.
        alpha = torch.where(curvature > _TINY, rs / curvature.clamp_min(_TINY), torch.zeros_like(rs))
        x = [xi + task_view(alpha, xi) * pi for xi, pi in zip(x, p)]
        r = [ri - task_view(alpha, ri) * api for ri, api in zip(r, ap)]
        rs_next = task_dot(r, r)
        beta = rs_next / rs.clamp_min(_TINY)
        p = [ri + task_view(beta, ri) * pi for ri, pi in zip(r, p)]
        rs = rs_next
    return x


def implicit_meta_gradient(task_model, adapted: dict[str, Tensor], xs, ys, xq, yq, settings: InnerLoopSettings,
                           curvature_scale: float, cg_steps: int) -> tuple[list[Tensor], Tensor, Tensor]:
    """(v per adapted weight [T, *shape], query loss [T], query accuracy [T]) at the adapted
    weights: v = (I + H / curvature_scale)^-1 grad L_query, H the support loss's Hessian there
    (curvature_scale: lambda, plus the damping of MAMLConfig.imaml_damping)."""
    phi = {k: w.detach().requires_grad_(True) for k, w in adapted.items()}
    leaves = list(phi.values())
    step = settings.steps
    q_loss, q_acc = per_task_loss(task_model(phi, xq, step=step, bn_mode=settings.bn_mode), yq, settings.loss, "query")
    g_query = torch.autograd.grad(q_loss.sum(), leaves)
    s_loss, _ = per_task_loss(task_model(phi, xs, double_backward=True, step=step, bn_mode=settings.bn_mode), ys,
                              settings.loss)
    g_support = torch.autograd.grad(s_loss.sum(), leaves, create_graph=True)

    # A gradient with no graph (a conv bias right before a batch norm: always 0) adds nothing to H v.
    live = [i for i, g in enumerate(g_support) if g.requires_grad]

    def apply_a(v: list[Tensor]) -> list[Tensor]:  # (I + H / curvature_scale) v, every task at once
        hv = torch.autograd.grad([g_support[i] for i in live], leaves, grad_outputs=[v[i] for i in live],
                                 retain_graph=True, allow_unused=True)
        return [vi if hi is None else vi + hi / curvature_scale for vi, hi in zip(v, hv)]
    v = conjugate_gradient(apply_a, list(g_query), cg_steps)
    return [t.detach() for t in v], q_loss.detach(), q_acc
