"""Configs, checkpoints with exact resume, the training runner and CLI errors, CPU dev mode."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meta_kernels.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from meta_kernels.cli import main
from meta_kernels.config import ConfigError, MetaLearningFullConfig
from tests.conftest_data import shared_data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_env(monkeypatch, tmp_path_factory):
    root = shared_data_dir()
    if root is None:
        pytest.skip("real Omniglot not found: set META_KERNELS_DATA")
    monkeypatch.setenv("META_KERNELS_DATA", str(root))
    # One decode cache for the whole session: the runner tests load the same small zips.
    monkeypatch.setenv("META_KERNELS_CACHE", str(tmp_path_factory.getbasetemp() / "runner-cache"))
    return root


def test_presets_round_trip_and_overrides(tmp_path):
    for name in ("minimal", "dev"):
        cfg = MetaLearningFullConfig.preset(name)
        for suffix in (".yaml", ".json"):
            cfg.save(tmp_path / f"c{suffix}")
            assert MetaLearningFullConfig.load(tmp_path / f"c{suffix}") == cfg
    cfg = MetaLearningFullConfig.dev().with_overrides(["maml.algo=fomaml", "mamlpp.bn_mode=transductive", "maml.inner_lr=0.2",
                                                       "run.epochs=3"])
    assert (cfg.maml.algo, cfg.maml.second_order, cfg.maml.inner_lr, cfg.run.epochs) == ("fomaml", False, 0.2, 3)


def test_configs_from_before_the_model_section_still_load():
    old = MetaLearningFullConfig.dev().to_dict()
    del old["model"]
    old["run"]["model_filters"] = 32
    cfg = MetaLearningFullConfig.from_dict(old)
    assert cfg.model.filters == 32 and cfg.model.arch == "conv4"


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'"):
        MetaLearningFullConfig.preset("huge")
    with pytest.raises(ConfigError, match=r"unknown key 'inner_lrr' in section 'maml'"):
        MetaLearningFullConfig.dev().with_overrides(["maml.inner_lrr=0.1"])
    with pytest.raises(ConfigError, match=r"MAMLConfig.inner_lr: must be > 0 and at most 3.4e\+38 .*got -1"):
        MetaLearningFullConfig.dev().with_overrides(["maml.inner_lr=-1"])
    with pytest.raises(ConfigError, match=r"must look like section.key=value"):
        MetaLearningFullConfig.dev().with_overrides(["inner_lr=0.1"])
    (tmp_path / "bad.yaml").write_text("maml:\n  inner_steps: 0\n")
    with pytest.raises(ConfigError, match=r"MAMLConfig.inner_steps: must be an integer >= 1, got 0"):
        MetaLearningFullConfig.load(tmp_path / "bad.yaml")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"value": 1})

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"value": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_checkpoint_load_errors(tmp_path, monkeypatch):
    import meta_kernels.checkpoint as checkpoint
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt"):
        load_checkpoint(tmp_path / "junk.pt")
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 99)
    save_checkpoint(tmp_path / "future.pt", {})
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"format version 99; this meta_kernels reads version 2"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_resume_is_bit_identical(data_env, tmp_path):
    from meta_kernels.train import Trainer
    cfg = MetaLearningFullConfig.minimal().with_overrides(["checkpoint.every_steps=1", "run.val_every=100"])
    straight = Trainer(cfg, tmp_path / "a", progress=False)
    straight.fit(max_steps=4)
    first = Trainer(cfg, tmp_path / "b", progress=False)
    first.fit(max_steps=2)
    resumed = Trainer(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.global_step == 2
    resumed.fit(max_steps=4)
    for a, b in zip(_params(straight), _params(resumed)):
        assert torch.equal(a, b)
    ck = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    for key in ("model", "learner", "config", "algo", "inner_steps", "inner_lrs", "rng", "sampler", "counters"):
        assert key in ck, key
    assert "optimizer" in ck["learner"] and ck["config"]["episodes"]["n_way"] == 5
    changed = cfg.with_overrides(["maml.inner_lr=0.1", "episodes.q_query=3"])
    with pytest.raises(CheckpointError, match=r"(?s)maml.inner_lr: checkpoint 0.4 != now 0.1.*episodes.q_query"):
        Trainer(changed, tmp_path / "b", resume=True, progress=False)


def test_resume_after_sigkill_matches_uninterrupted_run(data_env, tmp_path):
    from meta_kernels.train import Trainer
    cfg = MetaLearningFullConfig.minimal().with_overrides(["checkpoint.every_steps=1", "run.val_every=100"])
    cfg.save(tmp_path / "cfg.yaml")
    script = (
        "import os, signal, sys\n"
        "from meta_kernels.config import MetaLearningFullConfig\n"
        "from meta_kernels.train import Trainer\n"
        "t = Trainer(MetaLearningFullConfig.load(sys.argv[1]), sys.argv[2], progress=False)\n"
        "save = t.save\n"
        "def save_then_die(name):\n"
        "    path = save(name)\n"
        "    if t.global_step == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return path\n"
        "t.save = save_then_die\n"
        "t.fit(max_steps=10)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cfg.yaml"), str(tmp_path / "killed")],
                          env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    resumed = Trainer(cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed.global_step == 3
    resumed.fit(max_steps=5)
    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    straight.fit(max_steps=5)
    for a, b in zip(_params(straight), _params(resumed)):
        assert torch.equal(a, b)


def test_cpu_dev_mode_one_epoch_lowers_validation_loss(data_env, tmp_path):
    """CPU dev mode: Conv4, 50 episodes, 3 inner steps, one epoch end to end; metrics JSON written and
    the query loss on fixed validation episodes goes down."""
    from meta_kernels.train import Trainer
    cfg = MetaLearningFullConfig.dev()
    assert (cfg.episodes.episodes_per_epoch, cfg.maml.inner_steps, cfg.model.filters) == (50, 3, 64)
    trainer = Trainer(cfg, tmp_path / "dev", progress=False)
    before = trainer.evaluate("val", 20)
    summary = trainer.fit()
    after = trainer.evaluate("val", 20)
    assert summary["epoch"] == 1 and summary["global_step"] == 50 // cfg.maml.meta_batch_size
    assert after["query_loss"] < before["query_loss"]
    metrics = json.loads((tmp_path / "dev" / "metrics.json").read_text())
    assert metrics["global_step"] == summary["global_step"]
    lines = (tmp_path / "dev" / "metrics.jsonl").read_text().splitlines()
    assert len([l for l in lines if '"train"' in l]) == summary["global_step"]
    assert (tmp_path / "dev" / "training_curves.png").stat().st_size > 0


def test_cli_train_eval_and_errors(data_env, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "minimal", "--out", str(out), "--test"]) == 0
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "test" / "eval.json").is_file()
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--episodes", "10",
                 "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["episodes"] == 10 and 0 <= result["auac"] <= 1 and len(result["curve_accuracy"]) == 2
    assert (tmp_path / "ev" / "adaptation_curve.png").is_file()
    capsys.readouterr()
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["train", "--preset", "minimal", "--set", "maml.bogus=1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert main(["train", "--preset", "minimal", "--resume", "--out", str(tmp_path / "fresh")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert main(["train", "--preset", "minimal", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert "Omniglot" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
        target = tmp_path / "afile" / "sub"
        (tmp_path / "afile").write_text("")
    else:
        target = locked / "sub"
    assert main(["train", "--preset", "minimal", "--out", str(target)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_cli_trains_resumes_and_evaluates_a_user_model(data_env, tmp_path, monkeypatch, capsys):
    """--model package.module:factory builds the user's model; the config records it, resume and
    eval rebuild it when --model names it again."""
    monkeypatch.syspath_prepend(str(REPO))
    out = tmp_path / "own"
    common = ["--preset", "minimal", "--model", "tests.user_factory:small_cnn", "--out", str(out),
              "--set", "mamlpp.bn_mode=transductive"]
    assert main(["train", *common, "--max-steps", "2", "--set", "checkpoint.every_steps=1"]) == 0
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["config"]["model"]["factory"] == "tests.user_factory:small_cnn"
    assert any(k.startswith("0.") for k in ck["model"]), "the checkpoint holds the user model's weights"
    assert main(["train", *common, "--resume", "--max-steps", "3", "--set", "checkpoint.every_steps=1"]) == 0
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--episodes", "4",
                 "--model", "tests.user_factory:small_cnn", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["episodes"] == 4
    capsys.readouterr()
    assert main(["train", "--preset", "minimal", "--model", "tests.user_factory:not_a_model",
                 "--set", "mamlpp.bn_mode=transductive", "--out", str(tmp_path / "bad")]) == 2
    assert "returned str, not an nn.Module" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"ModelConfig.factory: must be 'package.module:function'"):
        MetaLearningFullConfig.minimal().with_overrides(["model.factory=no_colon"])
