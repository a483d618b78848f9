"""Issue 19 items 3-4: the Vinyals Omniglot split on a stand-in with the full set's folders and
counts, the published recipes (dry runs), and evaluation with the papers' test protocol."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from meta_kernels.config import ConfigError, MetaLearningFullConfig
from meta_kernels.data import DataError, load_omniglot
from meta_kernels.recipes import RECIPES, main as recipe_main
from tests.test_runner import data_env  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory) -> Path:
    """images_background (30 alphabets, 964 characters) and images_evaluation (20, 659) unpacked,
    two tiny drawings per character. Alphabet names interleave the two sets (Alpha00 background,
    Alpha01 evaluation, ...) so the split's order runs across both, as the real names do."""
    root = tmp_path_factory.mktemp("omniglot_full")
    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, format="PNG")
    png = buf.getvalue()
    for name, alphabets, chars, parity in (("images_background", 30, 964, 0), ("images_evaluation", 20, 659, 1)):
        for a, count in enumerate(_spread(chars, alphabets)):
            for c in range(count):
                d = root / name / f"Alpha{2 * a + parity:02d}" / f"character{c + 1:02d}"
                d.mkdir(parents=True)
                for i in range(2):
                    (d / f"{i}.png").write_bytes(png)
    return root


def _chars(data) -> set[str]:
    return {n.rsplit("/", 1)[0] for n in data.class_names}  # 'Alphabet/character/rot90' -> 'Alphabet/character'


def test_vinyals_split_counts_disjoint_deterministic(full_tree, tmp_path):
    load = lambda split, **kw: load_omniglot(full_tree, split, variant="full", scheme="vinyals", image_size=8,
                                             cache_dir=tmp_path, **kw)
    parts = {s: load(s) for s in ("train", "val", "test")}
    chars = {s: _chars(d) for s, d in parts.items()}
    assert (len(chars["train"]), len(chars["val"]), len(chars["test"])) == (960, 240, 423)
    assert len(chars["train"] | chars["val"]) == 1200
    assert not chars["train"] & chars["val"] and not (chars["train"] | chars["val"]) & chars["test"]
    # x4 classes: each character's rotations by 0/90/180/270 degrees, all in its split.
    assert [len(parts[s].class_names) for s in ("train", "val", "test")] == [3840, 960, 1692]
    # The fixed order: all 1623 'Alphabet/character' names sorted, the first 1200 for training.
    everything = sorted(chars["train"] | chars["val"] | chars["test"])
    assert len(everything) == 1623 and chars["test"] == set(everything[1200:])
    assert {c.split("/")[0] for c in chars["test"]} & {f"Alpha{i:02d}" for i in range(0, 50, 2)}  # both sets
    assert parts["test"].info["scheme"] == "vinyals"
    # Deterministic: the same again; another split_seed moves only the val carve-out.
    assert _chars(load("val")) == chars["val"] and _chars(load("test")) == chars["test"]
    other = {s: _chars(load(s, split_seed=1)) for s in ("train", "val", "test")}
    assert other["val"] != chars["val"] and other["train"] | other["val"] == chars["train"] | chars["val"]
    assert other["test"] == chars["test"]
    assert _chars(load("train", val_fraction=0.1)).__len__() == 1080


def test_vinyals_split_refuses_other_sets(full_tree, tmp_path):
    with pytest.raises(DataError, match="use variant='full'"):
        load_omniglot(full_tree, "train", variant="small", scheme="vinyals")
    with pytest.raises(DataError, match="unknown Omniglot split scheme 'lake'"):
        load_omniglot(full_tree, "train", variant="full", scheme="lake")
    partial = tmp_path / "partial"
    (partial / "images_background" / "A" / "character01").mkdir(parents=True)
    (partial / "images_evaluation" / "B" / "character01").mkdir(parents=True)
    for d in ("images_background/A", "images_evaluation/B"):
        Image.new("L", (8, 8), 255).save(partial / d / "character01" / "0.png")
    with pytest.raises(DataError, match="needs the 1623 characters .* found 2"):
        load_omniglot(partial, "test", variant="full", scheme="vinyals", image_size=8, cache_dir=tmp_path / "c")


def test_omniglot_split_config_is_validated():
    cfg = MetaLearningFullConfig().with_overrides(["run.omniglot_variant=full", "run.omniglot_split=vinyals"])
    assert cfg.run.omniglot_split == "vinyals"
    with pytest.raises(ConfigError, match=r"RunConfig.omniglot_split: must be 'default' or 'vinyals', got 'lake'"):
        MetaLearningFullConfig().with_overrides(["run.omniglot_split=lake"])
    with pytest.raises(ConfigError, match=r"RunConfig.omniglot_split: 'vinyals' .* run.omniglot_variant=full"):
        MetaLearningFullConfig().with_overrides(["run.omniglot_split=vinyals"])


def test_every_recipe_resolves(capsys):
    for name, recipe in RECIPES.items():
        assert recipe_main(recipe.dataset, ["--recipe", name, "--dry-run", "--data-root", "/data/x"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["config"]["run"]["data_root"] == "/data/x" and out["published_accuracy"] == recipe.published
        assert out["config"]["episodes"]["dataset"] == recipe.dataset and out["test_protocol"]["episodes"] >= 600
    maml = RECIPES["maml_omniglot_5w1s"].config()
    assert (maml.maml.inner_lr, maml.maml.inner_steps, maml.maml.meta_batch_size, maml.model.filters,
            maml.run.omniglot_split) == (0.4, 1, 32, 64, "vinyals")
    assert maml.run.epochs * maml.episodes.episodes_per_epoch // maml.maml.meta_batch_size == 60000
    assert RECIPES["maml_omniglot_20w1s"].config().maml.inner_steps == 5
    assert RECIPES["maml_mini_imagenet_5w1s"].test["inner_steps"] == 10
    for name in ("reptile_omniglot_5w1s", "reptile_mini_imagenet_5w1s"):  # Nichol et al.'s inner Adam
        rep = RECIPES[name].config().maml
        assert (rep.inner_optimizer, tuple(rep.inner_betas), rep.inner_lr, rep.inner_state, rep.inner_batch) == (
            "adam", (0.0, 0.999), 0.001, "carried", 10)
    pp = RECIPES["mamlpp_mini_imagenet_5w1s"].config()
    assert (pp.model.filters, pp.mamlpp.use_lslr, pp.mamlpp.bn_mode, pp.run.epochs) == (48, True, "per_step", 150)


def test_reproduce_scripts_dry_run():
    for script, recipe in (("reproduce_omniglot.py", "reptile_omniglot_5w1s"),
                           ("reproduce_mini_imagenet.py", "mamlpp_mini_imagenet_5w1s")):
        out = subprocess.run([sys.executable, str(REPO / "python" / script), "--recipe", recipe, "--dry-run"],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout
        assert json.loads(out)["recipe"] == recipe


def test_evaluation_protocol_is_settable_and_recorded(data_env, tmp_path):
    from meta_kernels.cli import main
    from meta_kernels.train import Trainer, evaluate_checkpoint
    cfg = MetaLearningFullConfig.minimal().with_overrides(["mamlpp.bn_mode=transductive", "run.val_every=100"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit(max_steps=2)
    ckpt = trainer.ckpt_dir / "last.pt"
    result = evaluate_checkpoint(ckpt, tmp_path / "eval", episodes=6, inner_steps=3, q_query=2)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["protocol"] == result["protocol"]
    p = saved["protocol"]
    assert (p["episodes"], p["n_way"], p["k_shot"], p["q_query"], p["inner_steps"], p["trained_inner_steps"],
            p["inner_lr"], p["split"], p["omniglot_split"]) == (6, 5, 1, 2, 3, 1, 0.4, "test", "default")
    assert len(saved["curve_accuracy"]) == 4 and saved["episodes"] == 6  # accuracy after 0..3 steps
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "cli"), "--episodes", "4",
                 "--inner-steps", "2", "--query", "3"]) == 0
    p = json.loads((tmp_path / "cli" / "eval.json").read_text())["protocol"]
    assert (p["episodes"], p["q_query"], p["inner_steps"]) == (4, 3, 2)
    assert main(["eval", "--checkpoint", str(ckpt), "--inner-steps", "0"]) == 2


def test_per_step_state_is_not_stretched(data_env, tmp_path):
    from meta_kernels.train import Trainer, evaluate_checkpoint
    trainer = Trainer(MetaLearningFullConfig.minimal().with_overrides(["run.val_every=100"]), tmp_path / "run",
                      progress=False)  # minimal: per-step BatchNorm for its 1 inner step
    trainer.fit(max_steps=1)
    with pytest.raises(ValueError, match="per-step BatchNorm for 1 steps; evaluate it with at most 1"):
        evaluate_checkpoint(trainer.ckpt_dir / "last.pt", tmp_path / "eval", episodes=2, inner_steps=3)
