"""Config values of the wrong type or out of range are refused with a ConfigError naming the field,
the value and what is allowed, from every way in: --set overrides, YAML and JSON files, from_dict
and the CLI's count flags. Numbers in any YAML spelling are read as numbers."""
import json
import math

import pytest

from meta_kernels.cli import main
from meta_kernels.config import ConfigError, MetaLearningFullConfig

# (how the value comes in, the input, the field the message must name, what it must say is allowed,
#  how it must show the value). Every row was accepted, or failed with a raw exception or a message
#  that does not say what is allowed, before the strict type checks.
BAD = [
    # --set SECTION.KEY=VALUE (the value parsed as YAML)
    ("set", "run.epochs=1.5", "epochs", "an integer", "1.5"),
    ("set", "mamlpp.use_lslr=banana", "use_lslr", "true or false", "'banana'"),
    ("set", "maml.inner_lr=inf", "inner_lr", "a finite number", "'inf'"),
    ("set", "maml.inner_lr=.nan", "inner_lr", "a finite number", "nan"),
    ("set", "maml.meta_lr=abc", "meta_lr", "a finite number", "'abc'"),
    ("set", "maml.meta_lr=1e-4x", "meta_lr", "a finite number", "'1e-4x'"),
    ("set", "maml.meta_batch_size=2.5", "meta_batch_size", "an integer", "2.5"),
    ("set", "maml.inner_steps=true", "inner_steps", "an integer", "True"),
    ("set", "maml.inner_clip=-.inf", "inner_clip", "a finite number or null", "-inf"),
    ("set", "maml.inner_clip=.inf", "inner_clip", "a finite number or null", "inf"),
    ("set", "maml.reptile_epsilon=nan", "reptile_epsilon", "a finite number", "'nan'"),
    ("set", "maml.recompute_inner=1", "recompute_inner", "true or false", "1"),
    ("set", "maml.skip_nonfinite_tasks=maybe", "skip_nonfinite_tasks", "true or false", "'maybe'"),
    ("set", "checkpoint.keep_last=2.5", "keep_last", "an integer", "2.5"),
    ("set", "checkpoint.every_steps=ten", "every_steps", "an integer", "'ten'"),
    ("set", "checkpoint.save_rng_state=2", "save_rng_state", "true or false", "2"),
    ("set", "model.filters=16.5", "filters", "an integer", "16.5"),
    ("set", "model.heads=[3]", "heads", "an integer", "[3]"),
    ("set", "run.seed=1.5", "seed", "an integer", "1.5"),
    ("set", "run.num_threads=two", "num_threads", "an integer", "'two'"),
    ("set", "run.keep_freed_cpu_memory=banana", "keep_freed_cpu_memory", "true or false", "'banana'"),
    ("set", "run.dist_timeout_s=.inf", "dist_timeout_s", "an integer", "inf"),
    ("set", "run.val_episodes=null", "val_episodes", "an integer", "None"),
    ("set", "mamlpp.annealing_start_epoch=true", "annealing_start_epoch", "an integer", "True"),
    ("set", "mamlpp.msl_decay_epochs=1e400", "msl_decay_epochs", "an integer", "'1e400'"),
    ("set", "maml.inner_lr={a: 1}", "inner_lr", "a finite number", "{'a': 1}"),
    # YAML files
    ("yaml", "maml: 3\n", "'maml'", "a mapping", "3"),
    ("yaml", "episodes: [1, 2]\n", "'episodes'", "a mapping", "[1, 2]"),
    ("yaml", "maml:\n  meta_batch_size: 2.5\n", "meta_batch_size", "an integer", "2.5"),
    ("yaml", "maml:\n  inner_lr: .inf\n", "inner_lr", "a finite number", "inf"),
    ("yaml", "mamlpp:\n  use_msl: banana\n", "use_msl", "true or false", "'banana'"),
    ("yaml", "run:\n  val_every: 1e400\n", "val_every", "an integer", "'1e400'"),
    ("yaml", "run:\n  device: 0\n", "device", "a string", "0"),
    # JSON files
    ("json", {"maml": {"inner_lr": math.nan}}, "inner_lr", "a finite number", "nan"),
    ("json", {"maml": {"meta_lr": math.inf}}, "meta_lr", "a finite number", "inf"),
    ("json", {"run": {"epochs": 1.5}}, "epochs", "an integer", "1.5"),
    ("json", {"mamlpp": {"use_lslr": "yes"}}, "use_lslr", "true or false", "'yes'"),
    ("json", {"checkpoint": {"keep_last": "3.5"}}, "keep_last", "an integer", "'3.5'"),
    ("json", {"model": {"patch_size": 7.5}}, "patch_size", "an integer", "7.5"),
    ("json", {"model": 7}, "'model'", "a mapping", "7"),
    # from_dict
    ("dict", {"maml": {"algo": 3}}, "algo", "a string", "3"),
    ("dict", {"maml": {"second_order": "yes"}}, "second_order", "true or false or null", "'yes'"),
    ("dict", {"maml": {"inner_clip": "none"}}, "inner_clip", "a finite number or null", "'none'"),
    ("dict", {"maml": {"meta_lr": 10 ** 400}}, "meta_lr", "a finite number", str(10 ** 400)),
    ("dict", {"run": {"epochs": math.nan}}, "epochs", "an integer", "nan"),
    ("dict", {"episodes": {"dataset": None}}, "dataset", "a string", "None"),
]


def _build(source, payload, tmp_path):
    if source == "set":
        return MetaLearningFullConfig.dev().with_overrides([payload])
    if source == "yaml":
        (tmp_path / "c.yaml").write_text(payload)
        return MetaLearningFullConfig.load(tmp_path / "c.yaml")
    if source == "json":
        (tmp_path / "c.json").write_text(json.dumps(payload))  # NaN / Infinity as Python's json writes them
        return MetaLearningFullConfig.load(tmp_path / "c.json")
    return MetaLearningFullConfig.from_dict(payload)


@pytest.mark.parametrize("source, payload, field, allowed, shown", BAD,
                         ids=[f"{r[0]}-{i}-{r[2]}" for i, r in enumerate(BAD)])
def test_bad_value_names_field_value_and_what_is_allowed(tmp_path, source, payload, field, allowed, shown):
    with pytest.raises(ConfigError) as info:
        _build(source, payload, tmp_path)
    message = str(info.value)
    assert field in message and f"must be {allowed}" in message and f"got {shown}" in message, message
    assert "\n" not in message


def test_yaml_number_spellings_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("maml:\n  meta_lr: 1e-4\n  inner_lr: 4E-1\nepisodes:\n  episodes_per_epoch: 1.6e4\n")
    cfg = MetaLearningFullConfig.load(tmp_path / "c.yaml")
    assert cfg.maml.meta_lr == 1e-4 and type(cfg.maml.meta_lr) is float
    assert cfg.maml.inner_lr == 0.4
    assert cfg.episodes.episodes_per_epoch == 16000 and type(cfg.episodes.episodes_per_epoch) is int


def test_set_number_spellings_are_numbers():
    cfg = MetaLearningFullConfig.dev().with_overrides(["maml.meta_lr=1e-4", "run.epochs=2.0", "maml.inner_steps='3'"])
    assert cfg.maml.meta_lr == 1e-4 and type(cfg.maml.meta_lr) is float
    assert cfg.run.epochs == 2 and type(cfg.run.epochs) is int
    assert cfg.maml.inner_steps == 3 and type(cfg.maml.inner_steps) is int


def test_string_numbers_in_json_and_dicts_are_converted(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"maml": {"meta_lr": "1e-4", "meta_batch_size": "8"}}))
    cfg = MetaLearningFullConfig.load(tmp_path / "c.json")
    assert cfg.maml.meta_lr == 1e-4 and cfg.maml.meta_batch_size == 8 and type(cfg.maml.meta_batch_size) is int
    cfg = MetaLearningFullConfig.from_dict({"maml": {"inner_lr": 1}, "run": {"seed": "7"}})
    assert type(cfg.maml.inner_lr) is float and cfg.run.seed == 7


def test_text_field_keeps_text_given_on_set():
    assert MetaLearningFullConfig.dev().with_overrides(["run.data_root=2024"]).run.data_root == "2024"


def test_yaml_syntax_errors_are_config_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("maml: {inner_lr: [\n")
    with pytest.raises(ConfigError, match=r"c\.yaml is not valid YAML: .*line 2"):
        MetaLearningFullConfig.load(tmp_path / "c.yaml")
    (tmp_path / "c.json").write_text('{"maml": ')
    with pytest.raises(ConfigError, match=r"c\.json is not valid JSON"):
        MetaLearningFullConfig.load(tmp_path / "c.json")
    with pytest.raises(ConfigError, match=r"override 'maml.inner_lr=\[1': the value is not valid YAML"):
        MetaLearningFullConfig.dev().with_overrides(["maml.inner_lr=[1"])


def test_from_dict_refuses_a_non_mapping():
    with pytest.raises(ConfigError, match=r"must be a mapping of sections"):
        MetaLearningFullConfig.from_dict([1, 2])


@pytest.mark.parametrize("argv, flag", [
    (["train", "--preset", "minimal", "--max-steps", "-1"], "--max-steps"),
    (["eval", "--checkpoint", "missing.pt", "--episodes", "0"], "--episodes"),
    (["eval", "--checkpoint", "missing.pt", "--episodes", "-5"], "--episodes"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--meta-batch", "0"], "--meta-batch"),
    (["demo", "--seed", "-1"], "--seed"),
], ids=["max-steps-negative", "episodes-zero", "episodes-negative", "demo-steps-zero", "demo-meta-batch-zero",
        "demo-seed-negative"])
def test_cli_counts_are_checked(tmp_path, capsys, argv, flag):
    code = main(argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert f"error: {flag}: must be an integer >= " in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_memory_gpus_are_checked(capsys):
    assert main(["memory", "--gpus", "8", "0"]) == 2
    assert "error: --gpus: must be an integer >= 1, got 0" in capsys.readouterr().err
