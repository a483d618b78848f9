"""The launcher the Triton inner optimizers with state share (momentum_step, adam_step): one
launch per tensor of the list, of a kernel taking (params, grads, *states, params_out,
*states_out, lrs, scale, rates, lr_index, numel, inner, *scalars)."""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from meta_kernels.triton._common import tl_compute_dtype

BLOCK = 1024


def launch(kernel, ins: list[list[Tensor]], outs: list[list[Tensor]], lrs: Tensor, scale: Tensor | None,
           rates: list[Tensor] | None, *scalars) -> None:
    """ins: [params, grads, *states] (contiguous); outs: [params_out, *states_out]."""
    params = ins[0]
    lrs = lrs.detach().contiguous()
    scale_c = scale.detach().contiguous() if scale is not None else lrs  # dummy pointers when unused
    rates_c = [r.detach().contiguous() for r in rates] if rates is not None else None
    rates_full = rates is not None and rates[0].dim() == params[0].dim()
    by_task = scale is not None or (rates is not None and not rates_full)
    for i, p in enumerate(params):
        numel = p.numel()
        if numel == 0:
            continue
        inner = numel // p.shape[0] if by_task and p.dim() >= 1 else numel
        kernel[(triton.cdiv(numel, BLOCK),)](
            *[lst[i] for lst in ins], *[lst[i] for lst in outs], lrs, scale_c, rates_c[i] if rates_c else lrs, i,
            numel, inner, *scalars, HAS_SCALE=scale is not None, HAS_RATES=rates is not None, RATES_FULL=rates_full,
            COMPUTE=tl_compute_dtype(p.dtype), BLOCK=BLOCK)


def out_of_place(lists: list[list[Tensor]], run) -> tuple[list[Tensor], ...]:
    """lists: [params, grads, *states]; returns new (params, *states) written by run(ins, outs)."""
    ins = [[t.contiguous() for t in lst] for lst in lists]
    outs = [[torch.empty_like(t, memory_format=torch.contiguous_format) for t in lst] for lst in [lists[0], *lists[2:]]]
    run(ins, outs)
    return tuple(outs)


def in_place(lists: list[list[Tensor]], run) -> None:
    """Updates params and states of lists = [params, grads, *states] through run(ins, outs); a
    non-contiguous one through a buffer copied back."""
    ins = [[t.contiguous() for t in lst] for lst in lists]
    targets = [lists[0], *lists[2:]]
    outs = [[t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format) for t in lst]
            for lst in targets]
    run(ins, outs)
    for lst, out in zip(targets, outs):
        for t, o in zip(lst, out):
            if o is not t:
                t.copy_(o)
