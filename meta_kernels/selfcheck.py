"""`meta-kernels validate`: the checks a user runs after installing, in about a minute on a CPU.

1. op self-checks: every op of the registry (meta_kernels.ops.OPS) on every usable backend
   against the reference on random inputs, values and gradients;
2. MAML's meta-gradient on a linear model against the hand-computed formula (float64);
3. Conv4 CPU dev mode -- one epoch of 50 episodes with 3 inner steps on Omniglot when
   the data is found ($META_KERNELS_DATA), metrics JSON written, validation loss goes down.
Prints PASS / FAIL / SKIP per check; the exit code is non-zero when any check fails."""
from __future__ import annotations

import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

import meta_kernels as mk
from meta_kernels.ops import OPS, _backend


def _op_checks(backend: str) -> str:
    """Every op of the registry that runs on `backend` against the reference (values and gradients)."""
    ran = []
    for op in OPS.values():
        if backend in op.backends:
            op.selfcheck(backend)
            ran.append(op.name)
    return ", ".join(ran)


def _meta_gradient_matches_formula() -> None:
    from torch import nn
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    g = torch.Generator().manual_seed(1)
    xs, ys, xq, yq = (torch.randn(3, n, d, generator=g, dtype=torch.float64) for n, d in ((6, 4), (6, 1), (8, 4), (8, 1)))
    cfg = mk.MAMLConfig(inner_steps=2, inner_lr=0.1, inner_clip=None, engine="custom", loss="mse")
    loss, _, _ = mk.meta_loss(dict(model.named_parameters()), (xs, ys, xq, yq), config=cfg, model=model, track_curve=False)
    loss.backward()
    w = model.weight.detach().T
    total = torch.zeros_like(w)
    for t in range(3):
        H = 2 / 6 * xs[t].T @ xs[t]
        wk = w.clone()
        for _ in range(2):
            wk = wk - 0.1 * (2 / 6 * xs[t].T @ (xs[t] @ wk - ys[t]))
        jac = torch.matrix_power(torch.eye(4, dtype=torch.float64) - 0.1 * H, 2)
        total += jac.T @ (2 / 8 * xq[t].T @ (xq[t] @ wk - yq[t]))
    torch.testing.assert_close(model.weight.grad.T, total / 3, rtol=0, atol=1e-12)
    if not bool(model.weight.grad.abs().sum() > 0):
        raise AssertionError("meta-gradient is zero")


def _dev_mode_epoch_lowers_validation_loss(out: Path) -> str:
    from meta_kernels.config import MetaLearningFullConfig
    from meta_kernels.train import Trainer
    trainer = Trainer(MetaLearningFullConfig.dev(), out, progress=False)
    before = trainer.evaluate("val", 20)
    summary = trainer.fit()
    after = trainer.evaluate("val", 20)
    if not (out / "metrics.json").is_file():
        raise AssertionError("metrics.json was not written")
    if not after["query_loss"] < before["query_loss"]:
        raise AssertionError(f"validation loss did not go down: {before['query_loss']:.3f} -> {after['query_loss']:.3f}")
    return (f"{summary['global_step']} steps, validation loss {before['query_loss']:.3f} -> {after['query_loss']:.3f}, "
            f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")


def run_selfcheck() -> int:
    checks = []
    for backend in ("reference", "cpp", "cuda", "triton"):
        devices = ("cpu",) if backend != "cuda" else ("cuda",)
        usable = _backend.available(backend, torch.device(devices[0]))[0]
        checks.append((f"ops on backend {backend!r}", (lambda b=backend: _op_checks(b)) if usable else None,
                       None if usable else _backend.available(backend, torch.device(devices[0]))[1]))
    checks.append(("MAML meta-gradient = hand-computed formula (float64)", _meta_gradient_matches_formula, None))
    tmp = Path(tempfile.mkdtemp(prefix="meta-kernels-validate-"))
    dev_epoch = lambda: _dev_mode_epoch_lowers_validation_loss(tmp / "dev")
    checks.append(("Conv4 CPU dev mode, one epoch on Omniglot", dev_epoch, None))
    failed = 0
    for name, fn, skip_reason in checks:
        if fn is None:
            print(f"SKIP  {name}: {skip_reason}")
            continue
        start = time.perf_counter()
        try:
            detail = fn()
            print(f"PASS  {name} ({time.perf_counter() - start:.1f} s){': ' + detail if detail else ''}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the next check runs
            from meta_kernels.data import DataError
            if isinstance(exc, DataError):
                print(f"SKIP  {name}: {exc}")
                continue
            failed += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=3)
    print(json.dumps({"failed": failed}))
    return 1 if failed else 0
