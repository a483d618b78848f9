"""The tests momentum_step and adam_step share, for one op described by a Spec: values against the
float64 reference (numel 1, sizes no multiple of any block, one crossing a CPU chunk, T = 1 and
32, float32 / float64 / bfloat16, with and without the per-task scale and per-element rates), in
place equal to out of place, non-contiguous inputs, gradcheck / gradgradcheck in float64, and
bad input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from tests.conftest import (F64, SHAPE_SETS, as_float64, assert_no_worse_than_torch, check_grad_and_gradgrad, gen,
                            small_lists, tensor_lists)


@dataclass
class Spec:
    name: str
    n_states: int
    out_of_place: Callable  # (params, grads, states, lrs, scale, rates, backend) -> (params, *states)
    in_place: Callable      # the same, updating params and states
    reference: Callable     # (params, grads, states, lrs, scale, rates) -> (params, *states)


def states_like(params, n, seed):
    """Running averages: random, the second moment non-negative."""
    g = gen(seed)
    return [[torch.randn(p.shape, generator=g, dtype=torch.float64).abs().to(p) for p in params] for _ in range(n)]


def rates_like(params, T, seed):
    g = gen(seed)
    return [torch.rand(p.shape[1:] if T is not None else p.shape, generator=g, dtype=torch.float64).to(p) + 0.5
            for p in params]


def check_matches_reference(spec: Spec, backend, device, shapes, T, dtype, with_rates):
    params, grads = tensor_lists(SHAPE_SETS[shapes], T, dtype, device, seed=hash((shapes, T)) % 2**31)
    states = states_like(params, spec.n_states, 7)
    lrs = torch.rand(len(params), generator=gen(1), dtype=torch.float64).to(device=device, dtype=torch.float32)
    scale = None if T is None else torch.rand(T, generator=gen(2)).to(device)
    rates = rates_like(params, T, 3) if with_rates else None
    ours = spec.out_of_place(params, grads, states, lrs, scale, rates, backend)
    torch_same = spec.reference(params, grads, states, lrs, scale, rates)
    truth = spec.reference(as_float64(params), as_float64(grads), [as_float64(s) for s in states], lrs.double(),
                           None if scale is None else scale.double(), None if rates is None else as_float64(rates))
    for k, (o_list, r_list, t_list) in enumerate(zip(ours, torch_same, truth)):
        for i, (o, r, t) in enumerate(zip(o_list, r_list, t_list)):
            assert o.shape == params[i].shape and o.dtype == dtype
            assert_no_worse_than_torch(o, r, t, dtype, what=f"{spec.name} output {k}[{i}]")


def check_in_place(spec: Spec, backend, device, T, dtype):
    params, grads = tensor_lists(SHAPE_SETS["mixed"], T, dtype, device, seed=3)
    states = states_like(params, spec.n_states, 4)
    lrs = torch.rand(len(params), generator=gen(4)).to(device)
    scale = None if T is None else torch.rand(T, generator=gen(5)).to(device)
    rates = rates_like(params, T, 6)
    expected = spec.out_of_place(params, grads, states, lrs, scale, rates, backend)
    spec.in_place(params, grads, states, lrs, scale, rates, backend)
    for got, want in zip([params, *states], expected):
        for p, e in zip(got, want):
            torch.testing.assert_close(p, e, rtol=0, atol=0)


def check_non_contiguous(spec: Spec, backend, device):
    base = torch.randn(2, 32, 6, 10, generator=gen(6), dtype=torch.float64).to(device)
    params = [base[0, :, :, ::2], base[1].transpose(1, 2)]  # strided and transposed views, not overlapping
    grads = [torch.randn_like(p) for p in params]
    states = [[s.transpose(1, 2).contiguous().transpose(1, 2) for s in lst] for lst in states_like(params, spec.n_states, 8)]
    lrs = torch.tensor([0.1, 0.3], dtype=torch.float64, device=device)
    scale = torch.rand(32, dtype=torch.float64, device=device)
    truth = spec.reference(params, grads, states, lrs, scale, None)
    for o_list, t_list in zip(spec.out_of_place(params, grads, states, lrs, scale, None, backend), truth):
        for o, t in zip(o_list, t_list):
            torch.testing.assert_close(o, t)
    spec.in_place(params, grads, states, lrs, scale, None, backend)
    for o_list, t_list in zip([params, *states], truth):
        for o, t in zip(o_list, t_list):
            torch.testing.assert_close(o, t)


def check_gradients(spec: Spec, backend, device, with_scale, with_rates):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (3, 5), (3,)]
    leaf = lambda s, positive=False: (torch.randn(s, generator=g, **F64).abs() + 0.1 if positive else
                                      torch.randn(s, generator=g, **F64)).to(device).requires_grad_()
    params, grads = [leaf(s) for s in shapes], [leaf(s) for s in shapes]
    states = [[leaf(s, positive=True) for s in shapes] for _ in range(spec.n_states)]
    lrs = torch.rand(3, generator=g, **F64).to(device).requires_grad_()
    scale = torch.rand(3, generator=g, **F64).to(device).add(0.5).requires_grad_()
    rates = [leaf(s[1:], positive=True) for s in shapes]
    n = len(shapes)

    def fn(*flat):
        lists = [list(flat[k * n:(k + 1) * n]) for k in range(2 + spec.n_states)]
        rest = list(flat[(2 + spec.n_states) * n:])
        lr = rest.pop(0)
        s = rest.pop(0) if with_scale else None
        r = rest if with_rates else None
        out = spec.out_of_place(lists[0], lists[1], lists[2:], lr, s, r, backend)
        return tuple(t for lst in out for t in lst)

    inputs = (*params, *grads, *[t for lst in states for t in lst], lrs, *([scale] if with_scale else []),
              *(rates if with_rates else []))
    check_grad_and_gradgrad(fn, inputs)


def check_bad_input(spec: Spec, backend, device):
    p, g = small_lists(device)
    states = [[torch.zeros_like(t) for t in p] for _ in range(spec.n_states)]
    lrs = torch.tensor([0.1, 0.2], device=device)
    cases = [
        ((p, g, [[states[0][0]], *states[1:]], lrs, None, None), r"has 1 tensors but params has 2"),
        ((p, g, [[states[0][0], torch.zeros(3, 3, 2, device=device)], *states[1:]], lrs, None, None),
         r"\[1\] has shape \[3, 3, 2\] but params\[1\] has shape \[3, 2, 3\]"),
        ((p, g, states, lrs, None, [torch.ones(4, device=device), torch.ones(3, 2, device=device)]),
         r"rates\[1\] has shape \[3, 2\]; it must be params\[1\]'s shape \[3, 2, 3\] or that without the task dim"),
        ((p, g, states, lrs, None, [torch.ones(4, device=device), torch.ones(3, 2, 3, device=device)]),
         r"rates\[1\] has the leading dim but rates\[0\] lacks it"),
        ((p, g, states, lrs, None, [torch.ones(4, device=device, dtype=torch.float64), torch.ones(2, 3, device=device)]),
         r"rates\[0\] is torch.float64 but params\[0\] is torch.float32"),
        ((p, g, states, lrs, torch.ones(4, device=device), None), r"scale has 4 entries but params have 3 tasks"),
    ]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            spec.out_of_place(*args, backend)
