"""torchrun with 2 gloo ranks on the CPU: the same parameters as one process with the full
meta-batch, and a dead rank stops the job (or, with --max-restarts, it resumes and finishes)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meta_kernels.config import MetaLearningFullConfig
from meta_kernels.train import Trainer
from tests.conftest_data import shared_data_dir

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
# SGD outer steps: Adam would turn the float32 noise of the conv biases' meta-gradient (exactly
# zero in exact arithmetic, BatchNorm follows each conv) into lr-sized, order-dependent moves.
COMMON = ["maml.meta_optimizer=sgd", "maml.meta_lr=0.05", "maml.meta_batch_size=4", "episodes.episodes_per_epoch=32", "checkpoint.every_steps=1", "run.val_every=1000", "run.dist_timeout_s=30"]


@pytest.fixture
def env(tmp_path_factory):
    data = shared_data_dir()
    if data is None:
        pytest.skip("real Omniglot not found: set META_KERNELS_DATA")
    cache = tmp_path_factory.getbasetemp() / "dist-cache"
    return {**os.environ, "META_KERNELS_DATA": str(data), "META_KERNELS_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(WORKER.parents[1])}


def _torchrun(out, overrides, env, *extra, steps=3, nproc=2, timeout=300, worker_args=()):
    """torchrun (options `extra`) of the worker with config `overrides` and `worker_args`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           str(WORKER), "--out", str(out), "--steps", str(steps), *worker_args]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _why(proc) -> str:
    """A failed launch's stderr: the ranks' own output first (where a crash says what it was),
    then the launcher's traceback last."""
    err = proc.stderr
    return err if len(err) <= 8000 else err[:5000] + "\n[...]\n" + err[-3000:]


def _single_process(out, overrides, env, steps=3):
    old = dict(os.environ)
    os.environ.update({k: env[k] for k in ("META_KERNELS_DATA", "META_KERNELS_CACHE")})
    try:
        trainer = Trainer(MetaLearningFullConfig.minimal().with_overrides(overrides), out, progress=False)
        trainer.fit(max_steps=steps)
        return trainer.model.state_dict()
    finally:
        os.environ.clear()
        os.environ.update(old)


def _assert_same_model(got: dict, expected: dict) -> None:
    """Equal within float32 reduction tolerance, and the run really moved the weights."""
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_two_ranks_match_one_process(tmp_path, env, algo):
    # per-step BN (MAML's, the default) trains only under second order
    overrides = COMMON + [f"maml.algo={algo}", *(["mamlpp.bn_mode=transductive"] if algo == "reptile" else [])]
    proc = _torchrun(tmp_path / "dist", overrides, env)
    assert proc.returncode == 0, _why(proc)
    sharded = torch.load(tmp_path / "dist" / "final.pt")
    single = _single_process(tmp_path / "single", overrides, env)
    _assert_same_model(sharded, single)
    initial = Trainer(MetaLearningFullConfig.minimal().with_overrides(overrides), tmp_path / "init", progress=False)
    assert not torch.equal(initial.model.state_dict()["head.weight"], single["head.weight"])


def test_dead_rank_stops_the_job_instead_of_hanging(tmp_path, env):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--max-restarts=0", str(WORKER), "--out", str(tmp_path / "run"), "--steps", "4",
                           "--die-rank", "1", "--die-at", "2"] + sum((["--set", o] for o in COMMON), []),
                          env=env, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    proc_args = (proc.returncode, proc.stderr[-2000:])
    assert proc.returncode != 0, proc_args
    assert seconds < 200, f"took {seconds:.0f} s to fail"


def test_restart_resumes_from_last_checkpoint_and_finishes(tmp_path, env):
    overrides = COMMON
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--max-restarts=1", str(WORKER), "--out", str(tmp_path / "run"), "--steps", "4",
                           "--die-rank", "1", "--die-at", "2"] + sum((["--set", o] for o in overrides), []),
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, _why(proc)
    restarted = torch.load(tmp_path / "run" / "final.pt")
    _assert_same_model(restarted, _single_process(tmp_path / "single", overrides, env, steps=4))
