"""Gradient diagnostics: catches the silent failure modes of meta-learning (an accidental detach
that zeroes the meta-gradient, parameters that never receive one)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class DetachedGraphError(RuntimeError):
    """Adapted parameters do not depend on the base parameters as the algorithm requires."""


def check_adapted_graph(adapted: dict[str, Tensor], params: dict[str, Tensor]) -> None:
    """Raises DetachedGraphError naming every adapted tensor with no path back to its base
    parameter (the meta-gradient would silently be zero there)."""
    if not isinstance(adapted, dict) or not adapted:
        raise ValueError(f"check_adapted_graph: adapted is {'empty' if isinstance(adapted, dict) else type(adapted).__name__}"
                         "; pass the dict of adapted weights adapt() returned, and the base params it started from")
    if not isinstance(params, dict):
        raise TypeError(f"check_adapted_graph: params must be the dict of base weights, dict(model.named_parameters()), "
                        f"got {type(params).__name__}")
    unknown = [k for k in adapted if k not in params]
    if unknown:
        raise ValueError(f"check_adapted_graph: params lack {unknown[:4]}, which adapted holds; pass the base weights "
                         "adapt() started from")
    broken = [k for k, v in adapted.items() if v.grad_fn is None]
    live = [k for k in adapted if k not in broken]
    if live:
        grads = torch.autograd.grad([adapted[k].sum() for k in live], [params[k] for k in live],
                                    retain_graph=True, allow_unused=True)
        broken += [k for k, g in zip(live, grads) if g is None]
    if broken:
        raise DetachedGraphError(f"adapted parameters {sorted(broken)} are detached from the base parameters: "
                                 "the meta-gradient cannot reach them (look for .detach(), .data, torch.no_grad() "
                                 "or a .item() round-trip in the inner loop)")


def params_without_meta_grad(model: nn.Module) -> list[str]:
    """Names of parameters whose .grad is missing or exactly zero after the meta-backward."""
    _check_module(model, "params_without_meta_grad")
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not bool(p.grad.any()))]


def meta_grad_norms(model: nn.Module) -> dict[str, float]:
    """Meta-gradient L2 norm per parameter tensor (0 for those without a gradient)."""
    _check_module(model, "meta_grad_norms")
    return {n: (float(p.grad.norm()) if p.grad is not None else 0.0) for n, p in model.named_parameters()}


def _check_module(model, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} takes the nn.Module that was meta-trained, got {type(model).__name__}")
