"""Where a run's records go: a small logger interface and the loggers that `run.loggers` names
(jsonl, csv, tensorboard, wandb).

A record is a flat dict of strict-JSON values (None where a value is missing or NaN) with a
"split" and a "global_step": 'train' (one per outer step), 'val' (one per validation) and 'test'
(the final evaluation, accuracy with its 95% CI). The Trainer sends the same records to every
logger, on rank 0 only. Your own logger: subclass Logger and pass it as
Trainer(config, out, loggers=[MyLogger()])."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np


def strict_json(value):
    """`value` with every non-finite float (NaN, inf) as None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return strict_json(value.item())
    return value


def json_line(record: dict) -> str:
    return json.dumps(strict_json(record), allow_nan=False) + "\n"


def flat(record: dict) -> dict:
    """The record with each list spread over keys key_0, key_1, ... (the adaptation curve)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            out.update({f"{key}_{i}": v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a record for a plotting logger, tagged split/key (lists spread as key_0, ...;
    None, a missing value, as NaN: a gap in the plot). Texts and the step itself are left out."""
    return {f"{record['split']}/{k}": math.nan if v is None else float(v) for k, v in flat(record).items()
            if k not in ("split", "global_step") and (v is None or isinstance(v, (int, float)))
            and not isinstance(v, bool)}


def hyperparameters(config: dict) -> dict:
    """A nested config (MetaLearningFullConfig.to_dict()) as section.key -> a number, bool or text."""
    return {f"{section}.{key}": value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for section, fields in config.items() for key, value in fields.items()}


class Logger:
    """Receives a run's records; override what you need. `start` comes once, before any record;
    `flush` after every outer step (before a checkpoint is saved); `close` at the end."""

    def start(self, out: Path, config: dict, history: list[dict]) -> None:
        """out: the run folder; config: the hyperparameters (MetaLearningFullConfig.to_dict());
        history: the records a resumed run continues from ([] for a fresh run). A logger that
        keeps files makes them hold these records, dropping what was logged after the checkpoint."""

    def log(self, record: dict) -> None:
        """One record (see the module's docstring)."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(Logger):
    """metrics.jsonl: one strict-JSON line per record."""

    def start(self, out, config, history):
        self.path = Path(out) / "metrics.jsonl"
        if history or self.path.exists():  # a resume: the lines written after the checkpoint are dropped
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json_line(record) for record in history))
            os.replace(tmp, self.path)

    def log(self, record):
        with self.path.open("a") as f:  # opened per record: each line is in the file once logged
            f.write(json_line(record))


class CsvLogger(Logger):
    """csv/train.csv, csv/val.csv, csv/test.csv: one file per kind of record, each with its own
    columns, one row per record -- what a spreadsheet opens. Lists (the adaptation curve) spread
    over columns key_0, key_1, ...; a missing value is an empty cell."""

    def start(self, out, config, history):
        self.folder = Path(out) / "csv"
        self.folder.mkdir(exist_ok=True)
        self.columns: dict[str, list[str]] = {}
        for path in self.folder.glob("*.csv"):  # rewritten from the history (a resume drops later rows)
            path.unlink()
        by_split: dict[str, list[dict]] = {}
        for record in history:
            by_split.setdefault(record["split"], []).append(flat(record))
        for split, rows in by_split.items():
            self._write(split, rows)

    def log(self, record):
        self._write(record["split"], [flat(record)])

    def _write(self, split: str, rows: list[dict]) -> None:
        path = self.folder / f"{split}.csv"
        columns = self.columns.get(split, [])
        new = list(dict.fromkeys(k for row in rows for k in row if k not in columns))
        if new:  # a first row, or one with a new field: the file is rewritten with the union of columns
            if path.exists():
                with path.open(newline="") as f:
                    rows = list(csv.DictReader(f)) + rows
            columns = self.columns[split] = columns + new
        with path.open("w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, columns, restval="")
            if new:
                writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


class TensorBoardLogger(Logger):
    """tensorboard/ (open with `tensorboard --logdir OUT/tensorboard`): every number of a record
    as the scalar split/key at its global step, and the config as hyperparameters. Needs the
    tensorboard package (`pip install tensorboard`, or the extra meta_kernels[tensorboard])."""

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"the tensorboard logger needs the tensorboard package: pip install tensorboard "
                              f"({exc})") from None
        self._writer_class = SummaryWriter

    def start(self, out, config, history):
        from torch.utils.tensorboard.summary import hparams
        # A resume: the events after the checkpoint's step are purged, as metrics.jsonl's lines are.
        purge = max(r["global_step"] for r in history) + 1 if history else None
        folder = Path(out) / "tensorboard"
        if not history:  # a fresh run (also --overwrite): no events of an earlier run
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = self._writer_class(str(folder), purge_step=purge)
        # The hyperparameters, with the metrics the HPARAMS tab shows beside them.
        for summary in hparams(hyperparameters(config), {"val/accuracy": 0.0, "test/accuracy": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def log(self, record):
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["global_step"])

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbLogger(Logger):
    """A Weights & Biases run (files under OUT/wandb; WANDB_MODE=offline keeps it local):
    train and validation numbers logged at their global step as split/key, the final evaluation
    in the run's summary, the config as the run's config. A resumed run starts a new W&B run.
    Needs the wandb package (`pip install wandb`)."""

    def __init__(self):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(f"the wandb logger needs the wandb package: pip install wandb ({exc})") from None
        self._wandb = wandb

    def start(self, out, config, history):
        self.run = self._wandb.init(dir=str(out), config=config)

    def log(self, record):
        if record["split"] == "test":  # logged after training, at an earlier step (the best checkpoint's)
            self.run.summary.update(scalars(record))
        else:
            self.run.log(scalars(record), step=record["global_step"])

    def close(self):
        self.run.finish()


LOGGER_CLASSES = {"jsonl": JsonlLogger, "csv": CsvLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def build_loggers(names: list[str]) -> list[Logger]:
    """The loggers of run.loggers (names checked by RunConfig)."""
    return [LOGGER_CLASSES[name]() for name in names]
