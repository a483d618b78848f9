"""Loggers (issue 18): every logger of run.loggers and a user's own receive the records of
metrics.jsonl (train steps, validations, inner steps when asked, the final evaluation), read back
here with each format's own reader; and the CPU memory tuning is opt-in outside the CLI."""
import csv
import json
import math
import struct
import sys
import time

import numpy as np
import pytest

from meta_kernels.config import LOGGERS, ConfigError, MetaLearningFullConfig
from meta_kernels.loggers import LOGGER_CLASSES, Logger, TensorBoardLogger, WandbLogger, flat, scalars

from test_runner import data_env  # noqa: F401 - the fixture


class Recorder(Logger):
    """A user's own logger: keeps what it is given."""

    def __init__(self):
        self.started, self.records, self.closed = [], [], False

    def start(self, out, config, history):
        self.started.append((config, list(history)))

    def log(self, record):
        self.records.append(record)

    def close(self):
        self.closed = True


def _config(*overrides):
    return MetaLearningFullConfig.minimal().with_overrides(["run.val_every=2", *overrides])


def _train(out, loggers, extra=(), max_steps=4, test=True):
    """A few minimal steps with a validation every 2, then the --test evaluation of best.pt."""
    from meta_kernels.train import Trainer, evaluate_checkpoint
    names = "[" + ",".join(loggers) + "]"
    trainer = Trainer(_config(f"run.loggers={names}", "run.log_inner_steps=true", "run.test_episodes=4"), out,
                      progress=False, loggers=extra)
    trainer.fit(max_steps=max_steps)
    if test:
        evaluate_checkpoint(trainer.ckpt_dir / "best.pt", out / "test", loggers=trainer.loggers)
    trainer.close()
    return trainer


def _jsonl(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _csv_rows(out, split):
    with (out / "csv" / f"{split}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _as_cells(record):
    return {k: "" if v is None else str(v) for k, v in flat(record).items()}


def _tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return events


def _expected_scalars(records):
    """tag -> [(step, value)] as the TensorBoard logger writes them (float32 in the event file)."""
    expected = {}
    for r in records:
        for tag, value in scalars(r).items():
            expected.setdefault(tag, []).append((r["global_step"], value))
    return expected


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or np.float32(a) == np.float32(b)


def test_logger_names_match_the_config():
    assert set(LOGGER_CLASSES) == set(LOGGERS)


def test_every_logger_receives_the_jsonl_records(data_env, tmp_path):
    pytest.importorskip("tensorboard")
    mine = Recorder()
    trainer = _train(tmp_path / "run", ["jsonl", "csv", "tensorboard"], extra=[mine])
    records = _jsonl(tmp_path / "run")
    assert [r["split"] for r in records] == ["train", "train", "val", "train", "train", "val", "test"]
    assert all("inner0_loss" in r and "inner0_grad_norm" in r for r in records if r["split"] == "train")
    assert records[-1]["ci95"] is not None and len(records[-1]["curve_accuracy"]) == 2
    # The user's logger: the same records, the config once, closed at the end.
    assert mine.records == records
    assert mine.started == [(trainer.config.to_dict(), [])] and mine.closed
    # CSV: one file per kind of record, each row the JSONL record (lists spread over columns).
    for split in ("train", "val", "test"):
        assert _csv_rows(tmp_path / "run", split) == [_as_cells(r) for r in records if r["split"] == split]
    # TensorBoard, read with tensorboard's own reader: every number at its global step.
    events = _tensorboard(tmp_path / "run")
    expected = _expected_scalars(records)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert all(_same(a, b) for (_, a), (_, b) in zip(got, points)), tag
    # ... and the config as hyperparameters.
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = events.PluginTagToContent("hparams")
    start = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()]
    hparams = next(p.session_start_info.hparams for p in start if p.HasField("session_start_info"))
    assert hparams["maml.inner_lr"].number_value == pytest.approx(0.4)
    assert hparams["run.loggers"].string_value == '["jsonl", "csv", "tensorboard"]'


def test_a_resume_cuts_every_log_back_to_the_checkpoint(data_env, tmp_path):
    pytest.importorskip("tensorboard")
    from meta_kernels.train import Trainer
    out = tmp_path / "run"
    _train(out, ["jsonl", "csv", "tensorboard"], max_steps=3, test=False)  # checkpoints at steps 2 and 3
    (out / "checkpoints" / "last.pt").unlink()
    (out / "checkpoints" / "step-3.pt").unlink()  # as if killed after logging step 3, before saving it
    cfg = _config("run.loggers=[jsonl,csv,tensorboard]", "run.log_inner_steps=true", "run.test_episodes=4")
    with pytest.warns(UserWarning, match="step-2.pt"):
        resumed = Trainer(cfg, out, resume=True, progress=False)
    resumed.fit(max_steps=4)
    resumed.close()
    records = _jsonl(out)
    assert [r["global_step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    for split in ("train", "val"):
        assert _csv_rows(out, split) == [_as_cells(r) for r in records if r["split"] == split]
    events = _tensorboard(out)  # two event files; the first one's step 3 is purged
    assert [(e.step, e.value) for e in events.Scalars("train/query_loss")] == [
        (r["global_step"], pytest.approx(r["query_loss"], rel=1e-6)) for r in records if r["split"] == "train"]


def _wandb_records(path):
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2
    data, pos, chunk, records = path.read_bytes(), 7, b"", []  # 7: the file header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def _finished_wandb_records(path, timeout=60.0):
    """W&B's service may still write the file after run.finish() returns: wait for its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_receives_the_jsonl_records(data_env, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                       "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(var, str(value))
    _train(tmp_path / "run", ["jsonl", "wandb"])
    records = _jsonl(tmp_path / "run")
    [path] = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = _finished_wandb_records(path)
    key = lambda item: item.key or "/".join(item.nested_key)
    history = [{key(i): json.loads(i.value_json) for i in r.history.item if not key(i).startswith("_")}
               for r in logged if r.WhichOneof("record_type") == "history"]
    # One history row per step: the train record with that step's validation.
    by_step = {}
    for r in records[:-1]:
        by_step.setdefault(r["global_step"], {}).update(scalars(r))
    assert len(history) == len(by_step)
    for row, expected in zip(history, by_step.values()):
        assert set(row) == set(expected)
        assert all(_same(row[k], v) for k, v in expected.items())
    summary = {key(i): json.loads(i.value_json) for r in logged if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert all(_same(summary[k], v) for k, v in scalars(records[-1]).items())  # the final evaluation
    config = {key(i): json.loads(i.value_json) for r in logged if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}
    assert config["maml"]["inner_lr"] == pytest.approx(0.4)


def test_a_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbLogger()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardLogger()


def test_unknown_logger_names_are_config_errors():
    with pytest.raises(ConfigError, match=r"RunConfig\.loggers: unknown logger\(s\) \['mlflow'\]; choose from "
                                          r"jsonl, csv, tensorboard, wandb"):
        _config("run.loggers=[jsonl,mlflow]")
    with pytest.raises(ConfigError, match=r"RunConfig\.loggers: must be a list of strings, got 3"):
        _config("run.loggers=3")
    assert _config("run.loggers=csv").run.loggers == ["csv"]
    assert _config("run.loggers=[]").run.loggers == []
    with pytest.raises(ConfigError, match="run.log_inner_steps"):
        MetaLearningFullConfig.production_1b().with_overrides(["run.log_inner_steps=true"])


def test_memory_tuning_is_on_in_the_cli_only(data_env, tmp_path, monkeypatch):
    import meta_kernels.train as train
    from meta_kernels.cli import main
    calls = []
    monkeypatch.setattr(train, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    train.Trainer(_config(), tmp_path / "lib", progress=False)
    assert calls == []  # a library user opts in
    train.Trainer(_config("run.keep_freed_cpu_memory=true"), tmp_path / "opted", progress=False)
    assert calls == [1]
    args = ["train", "--preset", "minimal", "--max-steps", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    assert calls == [1, 1]
    assert main([*args, "--out", str(tmp_path / "off"), "--set", "run.keep_freed_cpu_memory=false"]) == 0
    assert calls == [1, 1]
    records = _jsonl(tmp_path / "cli")
    assert not any(k.startswith("inner") for k in records[0])  # inner-step logs are opt-in


@pytest.mark.parametrize("algo, bn_mode, msl", [("maml", "transductive", False), ("fomaml", "transductive", True),
                                                ("maml", "per_step", False), ("reptile", "transductive", False)])
def test_inner_step_logs_change_nothing_else(algo, bn_mode, msl):
    """MetaLearner.step(log_inner_steps=True) on each of its paths (meta_backward, meta_loss, Reptile)."""
    import torch
    from meta_kernels.config import MAMLConfig, MAMLPlusPlusConfig
    from meta_kernels.meta import MetaLearner
    from meta_kernels.models import Conv4

    def step(log_inner_steps):
        torch.manual_seed(0)
        model = Conv4(in_channels=1, n_way=5, filters=4, image_size=28, bn_steps=3 if bn_mode == "per_step" else 1)
        learner = MetaLearner(model, MAMLConfig(algo=algo, inner_steps=2, inner_lr=0.4, engine="custom"),
                              mamlpp=MAMLPlusPlusConfig(bn_mode=bn_mode, use_msl=msl))
        g = torch.Generator().manual_seed(1)
        batch = (torch.rand(2, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(2, 1),
                 torch.rand(2, 10, 1, 28, 28, generator=g), torch.arange(5).repeat(2, 2))
        return learner.step(batch, log_inner_steps=log_inner_steps), list(model.parameters())

    plain, weights = step(False)
    logged, logged_weights = step(True)
    inner = {k: v for k, v in logged.items() if k.startswith("inner")}
    assert {k: v for k, v in logged.items() if k not in inner} == pytest.approx(plain, nan_ok=True)
    assert all(torch.equal(a, b) for a, b in zip(weights, logged_weights))
    assert sorted(inner) == sorted(f"inner{k}_{f}" for k in (0, 1) for f in
                                   ("loss", "accuracy", "grad_norm", "update_norm", "lr_mean", "clip_factor"))
    assert inner["inner0_lr_mean"] == pytest.approx(0.4)
