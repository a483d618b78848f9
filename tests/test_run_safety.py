"""Runs that survive and checkpoints that cannot hurt: safe loading, checksums with fallback,
--max-steps as a global step, clean stops on signals, an exact metrics.jsonl, the run-folder
lock, and resume refusing other data."""
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from meta_kernels.checkpoint import CheckpointError, MAGIC, load_checkpoint, save_checkpoint
from meta_kernels.config import MetaLearningFullConfig

from test_runner import _params, data_env  # noqa: F401 - the fixture

FAST = ["checkpoint.every_steps=1", "run.val_every=100", "run.epochs=5"]


def _config():
    return MetaLearningFullConfig.minimal().with_overrides(FAST)


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    plain = tmp_path / "plain.pt"
    torch.save({"format_version": 2, "model": Evil(marker)}, plain)
    # the same payload behind our header, with a valid checksum
    import hashlib
    body = plain.read_bytes()
    wrapped = tmp_path / "wrapped.pt"
    wrapped.write_bytes(MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    with pytest.raises(CheckpointError, match="header"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="refused: it holds something other than tensors"):
        load_checkpoint(wrapped)
    from meta_kernels.cli import main
    assert main(["eval", "--checkpoint", str(wrapped), "--out", str(tmp_path / "eval")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what the file holds really is code
        torch.load(plain, weights_only=True)


def _flip(path, offset_from_end=4096, n=64):
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - offset_from_end, len(raw) - offset_from_end + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_is_detected_and_resume_falls_back(data_env, tmp_path, capsys):
    from meta_kernels.train import Trainer
    cfg = _config()
    Trainer(cfg, tmp_path / "run", progress=False).fit(max_steps=3)
    ckpts = tmp_path / "run" / "checkpoints"
    _flip(ckpts / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt is corrupt: its checksum"):
        load_checkpoint(ckpts / "last.pt")
    from meta_kernels.cli import main
    assert main(["eval", "--checkpoint", str(ckpts / "last.pt"), "--out", str(tmp_path / "eval")]) == 2
    assert "last.pt is corrupt" in capsys.readouterr().err
    _flip(ckpts / "step-3.pt")
    with pytest.warns(UserWarning, match=r"resuming from .*step-2\.pt because .*last\.pt is corrupt.*step-3\.pt is corrupt"):
        resumed = Trainer(cfg, tmp_path / "run", resume=True, progress=False)
    assert resumed.global_step == 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["global_step"] for line in lines] == [1, 2]  # cut back to the checkpoint
    for p in ckpts.glob("*.pt"):
        _flip(p, offset_from_end=8192)  # not the bytes flipped before: that would mend them
    with pytest.raises(CheckpointError, match=r"(?s)no intact checkpoint.*last\.pt.*step-2\.pt"):
        Trainer(cfg, tmp_path / "run", resume=True, progress=False)


def _steps(run):
    return [json.loads(line)["global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]


def test_max_steps_is_the_global_step_and_is_saved(data_env, tmp_path):
    from meta_kernels.train import Trainer
    cfg = MetaLearningFullConfig.minimal().with_overrides(["checkpoint.every_steps=100", "run.val_every=100", "run.epochs=5"])
    Trainer(cfg, tmp_path / "run", progress=False).fit(max_steps=3)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["counters"]["global_step"] == 3
    resumed = Trainer(cfg, tmp_path / "run", resume=True, progress=False)
    resumed.fit(max_steps=5)
    assert _steps(tmp_path / "run") == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["counters"]["global_step"] == 5
    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    straight.fit(max_steps=5)
    assert all(torch.equal(a, b) for a, b in zip(_params(straight), _params(resumed)))


def _train_cli(out, *extra):
    cmd = [sys.executable, "-m", "meta_kernels.cli", "train", "--preset", "minimal", "--no-progress", "--out", str(out),
           *[a for f in FAST for a in ("--set", f)], *extra]
    return cmd


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_signals_save_the_step_and_stop(data_env, tmp_path, sig):
    """A signal during step 2 stops the run after that step, saved; resumed to step 5 it ends
    bit-identical to an uninterrupted run, with one strict-JSON line per step."""
    from meta_kernels.train import Trainer, TrainingInterrupted
    trainer = Trainer(_config(), tmp_path / "run", progress=False)
    step = trainer.learner.step

    def step_then_signal(*args, **kwargs):
        out = step(*args, **kwargs)
        if trainer.global_step == 1:  # the learner's step 2
            os.kill(os.getpid(), sig)
        return out

    trainer.learner.step = step_then_signal
    with pytest.raises(TrainingInterrupted, match=f"stopped by {sig.name} at step 2") as stopped:
        trainer.fit(max_steps=50)
    assert stopped.value.exit_code == 128 + sig
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["counters"]["global_step"] == 2
    assert signal.getsignal(sig) is not None and signal.getsignal(sig) != trainer  # handlers restored
    resumed = Trainer(_config(), tmp_path / "run", resume=True, progress=False)
    resumed.fit(max_steps=5)
    assert _steps(tmp_path / "run") == [1, 2, 3, 4, 5]
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    straight = Trainer(_config(), tmp_path / "straight", progress=False)
    straight.fit(max_steps=5)
    assert all(torch.equal(a, b) for a, b in zip(_params(straight), _params(resumed)))


def test_the_cli_exits_with_128_plus_the_signal_and_no_traceback(data_env, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cli(out, "--max-steps", "50"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-1.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in err and "--resume" in err and "Traceback" not in err


def test_sigkill_mid_write_leaves_the_previous_checkpoint_and_no_temp_file(data_env, tmp_path):
    from meta_kernels.train import Trainer
    cfg = _config()
    cfg.save(tmp_path / "cfg.yaml")
    script = (
        "import os, signal, sys\n"
        "import meta_kernels.checkpoint as ck\n"
        "from meta_kernels.config import MetaLearningFullConfig\n"
        "from meta_kernels.train import Trainer\n"
        "t = Trainer(MetaLearningFullConfig.load(sys.argv[1]), sys.argv[2], progress=False)\n"
        "replace = os.replace\n"
        "def die_mid_write(src, dst):\n"
        "    if t.global_step == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    replace(src, dst)\n"
        "ck.os.replace = die_mid_write\n"
        "t.fit(max_steps=10)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cfg.yaml"), str(tmp_path / "killed")],
                          env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpts = tmp_path / "killed" / "checkpoints"
    assert list(ckpts.glob(".*.tmp"))  # the write the kill interrupted
    resumed = Trainer(cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed.global_step == 2 and not list(ckpts.glob(".*.tmp"))
    resumed.fit(max_steps=4)
    assert _steps(tmp_path / "killed") == [1, 2, 3, 4]
    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    straight.fit(max_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(_params(straight), _params(resumed)))


def test_the_folder_lock_and_the_overwrite_refusal(data_env, tmp_path):
    from meta_kernels.train import Trainer, run_folder_lock
    cfg = _config()
    run = tmp_path / "run"
    run.mkdir()
    with run_folder_lock(run):
        with pytest.raises(CheckpointError, match=r"in use by another run \(pid \d+\)"):
            Trainer(cfg, run, progress=False)
    Trainer(cfg, run, progress=False).fit(max_steps=1)
    with pytest.raises(CheckpointError, match=r"holds a run .*--resume.*--overwrite"):
        Trainer(cfg, run, progress=False)
    Trainer(cfg, run, overwrite=True, progress=False).fit(max_steps=2)
    assert _steps(run) == [1, 2]


def test_resume_on_other_data_is_refused(data_env, tmp_path, monkeypatch):
    import meta_kernels.train as train
    cfg = _config()
    train.Trainer(cfg, tmp_path / "run", progress=False).fit(max_steps=1)
    real = train.load_split

    def other_archives(config, split):  # the same config, META_KERNELS_DATA pointing at other files
        data = real(config, split)
        return dataclasses.replace(data, info={**data.info, "sources": {"images_background_small1.zip": "0" * 64}})

    monkeypatch.setattr(train, "load_split", other_archives)
    with pytest.raises(CheckpointError, match=r"(?s)trained on other data.*checkpoint:.*now:.*0000000000"):
        train.Trainer(cfg, tmp_path / "run", resume=True, progress=False)


def test_metrics_and_eval_json_are_strict(data_env, tmp_path):
    from meta_kernels.train import Trainer, evaluate_checkpoint
    Trainer(_config(), tmp_path / "run", progress=False).fit(max_steps=2)
    result = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "eval", episodes=1)
    assert result["episodes"] == 1
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert strict((tmp_path / "eval" / "eval.json").read_text())["ci95"] is None
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        strict(line)


def test_a_checkpoint_never_makes_eval_or_resume_import_code(tmp_path, capsys, monkeypatch):
    """A crafted checkpoint (its checksum is anyone's to recompute) naming a model factory -- a
    standard-library module, or a .py file placed beside it -- makes eval and --resume import
    nothing; naming the factory with --model is how a user allows it."""
    from meta_kernels.cli import main
    from meta_kernels.train import load_checkpoint_model
    marker = tmp_path / "imported"
    (tmp_path / "evil_factory.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef make(n, s):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for factory in ("this:nope", "evil_factory:make"):
        config = _config().with_overrides([f"model.factory={factory}"])
        path = save_checkpoint(tmp_path / "crafted.pt", {"config": config.to_dict(), "model": {}})
        modules = set(sys.modules)
        assert main(["eval", "--checkpoint", str(path), "--out", str(tmp_path / "ev")]) == 2
        err = capsys.readouterr().err
        assert f"built by the factory {factory!r}" in err and f"--model {factory}" in err, err
        assert main(["eval", "--checkpoint", str(path), "--model", "tests.user_factory:small_cnn",
                     "--out", str(tmp_path / "ev")]) == 2
        assert "which is not it" in capsys.readouterr().err
        with pytest.raises(CheckpointError, match="factory="):
            load_checkpoint_model(path, {"model": {}}, config, (1, 28, 28))
        assert set(sys.modules) == modules and not marker.exists()
    config_file = tmp_path / "config.yaml"  # a run folder's config naming a factory: --resume asks for --model
    _config().with_overrides(["model.factory=evil_factory:make"]).save(config_file)
    assert main(["train", "--config", str(config_file), "--resume", "--out", str(tmp_path / "run")]) == 2
    assert "pass --model evil_factory:make" in capsys.readouterr().err
    assert not marker.exists()
