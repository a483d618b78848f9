"""Sharded (FSDP) first-order meta-learning and the production presets: 2 gloo ranks on the CPU
with a scaled-down ViT give the parameters of one unsharded process; bf16 autocast reaches the
query pass only; a killed rank restarts from the checkpoint; the presets' sizes and the memory
model behind the README's table."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from meta_kernels.config import ConfigError, MAMLConfig, MetaLearningFullConfig
from meta_kernels.fsdp_memory import memory_table, sharded_memory_per_gpu, vit_activation_bytes
from meta_kernels.meta import ShardedMetaLearner
from meta_kernels.models import Conv4, ViT, vit_param_count
from meta_kernels.checkpoint import CheckpointError, load_any_checkpoint, load_latest_intact
from meta_kernels.train import Trainer, evaluate_checkpoint, load_checkpoint_model
from tests.test_distributed import COMMON, _assert_same_model, _single_process, _torchrun, _why, env  # noqa: F401

SMALL_VIT = ["model.arch=vit", "model.dim=32", "model.depth=2", "model.heads=2", "model.patch_size=7",
             "mamlpp.bn_mode=transductive"]


@pytest.mark.parametrize("algo", ["fomaml", "reptile"])
def test_fsdp_two_ranks_match_one_unsharded_process(tmp_path, env, algo):
    overrides = COMMON + SMALL_VIT + [f"maml.algo={algo}"]
    proc = _torchrun(tmp_path / "fsdp", overrides + ["run.sharding=fsdp"], env)
    assert proc.returncode == 0, _why(proc)
    sharded = torch.load(tmp_path / "fsdp" / "final.pt")
    single = _single_process(tmp_path / "single", overrides, env)
    _assert_same_model(sharded, single)
    initial = Trainer(MetaLearningFullConfig.minimal().with_overrides(overrides), tmp_path / "init", progress=False)
    assert not torch.equal(initial.model.state_dict()["head.weight"], single["head.weight"])  # training moved it


@pytest.mark.slow
def test_scaled_down_production_preset_restarts_from_checkpoint(tmp_path, env):
    """The production_1b code path (FSDP, bf16 autocast, FOMAML) with a small ViT on Omniglot: a rank
    killed at step 2 restarts from the last checkpoint and ends where an uninterrupted run ends."""
    scaled = ["model.dim=32", "model.depth=2", "model.heads=2", "model.patch_size=7", "episodes.dataset=omniglot",
              "episodes.k_shot=1", "episodes.q_query=5", "episodes.episodes_per_epoch=32", "maml.meta_batch_size=4",
              "maml.inner_steps=2", "run.device=cpu", "run.val_every=1000", "run.dist_timeout_s=30",
              "checkpoint.every_steps=1"]
    preset = ["--preset", "production_1b"]
    restarted = _torchrun(tmp_path / "killed", scaled, env, "--max-restarts=1", steps=4,
                          worker_args=preset + ["--die-rank", "1", "--die-at", "2"])
    assert restarted.returncode == 0, _why(restarted)
    straight = _torchrun(tmp_path / "straight", scaled, env, steps=4, worker_args=preset)
    assert straight.returncode == 0, _why(straight)
    a, b = torch.load(tmp_path / "killed" / "final.pt"), torch.load(tmp_path / "straight" / "final.pt")
    for k in b:
        assert torch.equal(a[k], b[k]), k


# ---- sharded checkpoints (torch.distributed.checkpoint) ------------------------------------------
DCP_RUN = COMMON + SMALL_VIT + ["maml.algo=fomaml", "maml.meta_optimizer=adam", "maml.meta_lr=0.01",
                                "run.sharding=fsdp"]


def _assert_same_under_adam(got: dict, expected: dict) -> None:
    """_assert_same_model, but for the attention's key bias: its gradient is exactly zero (softmax
    ignores a shift shared by a query's scores), so Adam turns the float noise of another reduction
    order (another number of ranks) into lr-sized steps there."""
    for k, v in expected.items():
        g = got[k]
        if k.endswith("qkv.bias"):
            third = v.shape[0] // 3
            keep = torch.cat([torch.arange(third), torch.arange(2 * third, 3 * third)])
            g, v = g[keep], v[keep]
        torch.testing.assert_close(g, v, rtol=1e-4, atol=1e-5, msg=k)


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_dcp_checkpoints_are_sharded_and_reshard_on_resume(tmp_path, env, monkeypatch):
    """FSDP runs save step-N.dcp folders: each of 2 ranks writes its half of the Adam state; a
    run stopped at step 2 resumes on 1 and on 3 ranks (the 3-rank one past a corrupted newest
    folder) and ends where the uninterrupted 2-rank run ends; eval reads a folder unsharded."""
    ref = _torchrun(tmp_path / "ref", DCP_RUN, env, steps=4, worker_args=["--record-shards"])
    assert ref.returncode == 0, _why(ref)
    ckpts = tmp_path / "ref" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2.dcp", "step-3.dcp", "step-4.dcp"]  # keep_last=3
    step4 = ckpts / "step-4.dcp"
    names = sorted(p.name for p in step4.iterdir())
    assert ".metadata" in names and "meta.pt" in names and sum(n.endswith(".distcp") for n in names) == 2
    records = [json.loads((tmp_path / "ref" / f"shards-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(records[0]) == len(records[1]) == 4  # one record per save, the full state never asked for
    for r0, r1 in zip(*records):
        assert r0["full"] > 0 and r0["local"] + r1["local"] == r0["full"]
        assert max(r0["local"], r1["local"]) <= 0.55 * r0["full"], (r0, r1)
    final = torch.load(tmp_path / "ref" / "final.pt")

    # eval's path: the folder read into a plain model in this process, without a process group
    monkeypatch.setenv("META_KERNELS_DATA", env["META_KERNELS_DATA"])
    monkeypatch.setenv("META_KERNELS_CACHE", env["META_KERNELS_CACHE"])
    data = load_any_checkpoint(step4)
    assert data["counters"]["global_step"] == 4 and data["sharded"]["world_size"] == 2 and "model" not in data
    config = MetaLearningFullConfig.from_dict(data["config"])
    model = load_checkpoint_model(step4, data, config, (1, 28, 28))
    for k, v in final.items():
        assert torch.equal(model.state_dict()[k], v), k
    result = evaluate_checkpoint(step4, tmp_path / "eval", episodes=4)
    assert result["episodes"] == 4 and (tmp_path / "eval" / "eval.json").is_file()

    part = _torchrun(tmp_path / "part", DCP_RUN, env, steps=2)
    assert part.returncode == 0, _why(part)
    for nproc in (1, 3):
        run = tmp_path / f"resume{nproc}"
        shutil.copytree(tmp_path / "part", run)
        (run / "checkpoints" / ".step-3.dcp.tmp").mkdir()  # a save that a kill interrupted
        if nproc == 3:  # the newest folder corrupted: resume falls back to step-1.dcp
            _flip_byte(next((run / "checkpoints" / "step-2.dcp").glob("*.distcp")))
        proc = _torchrun(run, DCP_RUN, env, steps=4, nproc=nproc, worker_args=["--resume"])
        assert proc.returncode == 0, _why(proc)
        if nproc == 3:
            assert "step-2.dcp is corrupt" in proc.stderr and "does not match its checksum" in proc.stderr
        assert not (run / "checkpoints" / ".step-3.dcp.tmp").exists()
        assert load_any_checkpoint(run / "checkpoints" / "step-4.dcp")["sharded"]["world_size"] == nproc
        _assert_same_under_adam(torch.load(run / "final.pt"), final)


def test_corrupt_dcp_folder_is_named_and_passed_over(tmp_path):
    """verify_sharded (no process group): a changed shard, a missing file, a missing meta.pt."""
    from meta_kernels.checkpoint import save_checkpoint, verify_sharded
    from meta_kernels.data.cache import file_sha256
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2):
        folder = ckpts / f"step-{step}.dcp"
        folder.mkdir(parents=True)
        for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
            (folder / name).write_bytes(bytes(range(256)) * (step + 3))
        manifest = {p.name: file_sha256(p) for p in folder.iterdir()}
        save_checkpoint(folder / "meta.pt", {"counters": {"global_step": step}, "sharded": {"manifest": manifest}})
    assert verify_sharded(ckpts / "step-2.dcp")["counters"]["global_step"] == 2
    _flip_byte(ckpts / "step-2.dcp" / "__1_0.distcp")
    with pytest.warns(UserWarning, match=r"step-2\.dcp is corrupt: __1_0\.distcp does not match its checksum"):
        data, path = load_latest_intact(ckpts)
    assert path.name == "step-1.dcp" and data["counters"]["global_step"] == 1
    (ckpts / "step-1.dcp" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step-1\.dcp is corrupt: files missing \['\.metadata'\]"):
        verify_sharded(ckpts / "step-1.dcp")
    (ckpts / "step-1.dcp" / "meta.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_latest_intact(ckpts)


# ---- one rank, in this process: autocast placement, evaluation, errors --------------------------------
@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _tasks(T=2, support=5, query=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, support, 1, 28, 28, generator=g), torch.randint(0, 5, (T, support), generator=g),
            torch.randn(T, query, 1, 28, 28, generator=g), torch.randint(0, 5, (T, query), generator=g))


def _small_vit():
    torch.manual_seed(0)
    return ViT(in_channels=1, image_size=28, n_way=5, dim=32, depth=2, heads=2, patch_size=7)


def test_bf16_autocast_reaches_the_query_pass_only(one_rank_group):
    model = _small_vit()
    dtypes = []
    model.head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    learner = ShardedMetaLearner(model, MAMLConfig(algo="fomaml", inner_steps=2, inner_lr=0.1), autocast="bf16")
    metrics = learner.step(_tasks(T=1))
    assert dtypes == [torch.float32, torch.float32, torch.bfloat16]  # 2 inner steps, then the query pass
    assert math.isfinite(metrics["query_loss"]) and all(p.grad is None for p in learner.params)


def test_evaluation_leaves_the_weights_unchanged(one_rank_group):
    learner = ShardedMetaLearner(_small_vit(), MAMLConfig(algo="fomaml", inner_steps=3, inner_lr=0.5))
    before = [p.detach().full_tensor().clone() for p in learner.params]
    scores = learner.evaluate_tasks(_tasks(T=3))
    assert scores.curve_accuracy.shape == (3, 4) and scores.query_loss.shape == (3,)  # 3 tasks, 0..3 steps
    for b, p in zip(before, learner.params):
        assert torch.equal(b, p.detach().full_tensor())


def test_inner_clip_uses_the_norm_over_all_shards(one_rank_group):
    """One inner step with a tight clip equals theta - lr * (max_norm / ||g||) * g."""
    reference = _small_vit()
    xs, ys, _, _ = _tasks(T=1)
    loss = F.cross_entropy(reference(xs[0]), ys[0])
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    expected = [p.detach() - 0.1 * min(1.0, 0.01 / (float(norm) + 1e-6)) * g for p, g in zip(reference.parameters(), grads)]
    learner = ShardedMetaLearner(_small_vit(), MAMLConfig(algo="fomaml", inner_steps=1, inner_lr=0.1, inner_clip=0.01))
    learner._adapt(xs[0], ys[0])
    for e, p in zip(expected, learner.params):
        torch.testing.assert_close(p.detach().full_tensor(), e, rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused(one_rank_group):
    with pytest.raises(ValueError, match="fomaml.*reptile"):
        ShardedMetaLearner(_small_vit(), MAMLConfig(algo="maml"))
    with pytest.raises(ValueError, match="BatchNorm"):
        ShardedMetaLearner(Conv4(in_channels=1, n_way=5, filters=8, image_size=28), MAMLConfig(algo="fomaml"))
    with pytest.raises(ValueError, match="autocast"):
        ShardedMetaLearner(_small_vit(), MAMLConfig(algo="fomaml"), autocast="fp16")


def test_sharded_learner_needs_a_process_group():
    with pytest.raises(RuntimeError, match="torchrun"):
        ShardedMetaLearner(_small_vit(), MAMLConfig(algo="fomaml"))


# ---- presets and the memory model ---------------------------------------------------------------
@pytest.mark.parametrize("name,nominal", [("production_1b", 1e9), ("production_3b", 3e9), ("production_7b", 7e9)])
def test_production_presets_have_their_size_and_round_trip(tmp_path, name, nominal):
    config = MetaLearningFullConfig.preset(name)
    m = config.model
    count = vit_param_count(in_channels=3, image_size=84, n_way=5, dim=m.dim, depth=m.depth, heads=m.heads,
                            patch_size=m.patch_size, mlp_ratio=m.mlp_ratio)
    assert abs(count / nominal - 1) < 0.02
    assert (config.run.sharding, config.run.autocast, config.maml.algo) == ("fsdp", "bf16", "fomaml")
    config.save(tmp_path / "c.yaml")
    assert MetaLearningFullConfig.load(tmp_path / "c.yaml") == config


def test_vit_param_count_matches_the_model():
    model = ViT(in_channels=3, image_size=84, n_way=5, dim=48, depth=3, heads=4, patch_size=14, mlp_ratio=2)
    assert vit_param_count(in_channels=3, image_size=84, n_way=5, dim=48, depth=3, heads=4, patch_size=14,
                           mlp_ratio=2) == sum(p.numel() for p in model.parameters())


def _saved_bytes(model, x, autocast_bf16):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        F.cross_entropy(model(x).float(), torch.zeros(x.shape[0], dtype=torch.long))
    return sum(saved.values())


@pytest.mark.parametrize("autocast_bf16", [False, True])
@pytest.mark.parametrize("examples,dim,depth,heads", [(4, 64, 4, 4), (3, 128, 3, 8), (6, 96, 2, 4)])
def test_activation_bytes_bound_what_autograd_saves(examples, dim, depth, heads, autocast_bf16):
    """The memory model's activations are an upper bound within 12% of the bytes autograd saves."""
    torch.manual_seed(0)
    model = ViT(in_channels=3, image_size=56, n_way=5, dim=dim, depth=depth, heads=heads, patch_size=14)
    measured = _saved_bytes(model, torch.randn(examples, 3, 56, 56), autocast_bf16)
    computed = vit_activation_bytes(examples=examples, image_shape=(3, 56, 56), dim=dim, depth=depth, heads=heads,
                                    patch_size=14, autocast_bf16=autocast_bf16)
    assert measured <= computed <= 1.12 * measured, (measured, computed)


def test_memory_model_components():
    config = MetaLearningFullConfig.production_7b()
    eight, sixteen = sharded_memory_per_gpu(config, 8), sharded_memory_per_gpu(config, 16)
    assert eight["sharded_state"] == pytest.approx(24 * eight["parameters"] / 8)  # 6 fp32 copies, sharded
    assert sixteen["sharded_state"] == pytest.approx(eight["sharded_state"] / 2)
    assert eight["peak"] < 80e9  # fits an 80 GB H100 on 8 GPUs
    reptile = sharded_memory_per_gpu(config.with_overrides(["maml.algo=reptile"]), 8)
    assert reptile["sharded_state"] == pytest.approx(16 * eight["parameters"] / 8) and reptile["query_activations"] == 0


def test_config_refuses_what_sharding_cannot_run():
    base = MetaLearningFullConfig.production_1b()
    with pytest.raises(ConfigError, match="first-order"):
        base.with_overrides(["maml.algo=maml"])
    with pytest.raises(ConfigError, match="model.arch=vit"):
        base.with_overrides(["model.arch=conv4"])
    with pytest.raises(ConfigError, match="use_lslr"):
        base.with_overrides(["mamlpp.use_lslr=true"])
    with pytest.raises(ConfigError, match="bn_mode"):
        base.with_overrides(["mamlpp.bn_mode=per_step"])
    with pytest.raises(ConfigError, match="autocast"):
        MetaLearningFullConfig.dev().with_overrides(["run.autocast=bf16"])
    with pytest.raises(ConfigError, match="sharding"):
        MetaLearningFullConfig.dev().with_overrides(["run.sharding=zero3"])



def test_readme_memory_table_is_the_computed_one():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert memory_table() in readme, "README's memory table is stale: paste meta_kernels.fsdp_memory.memory_table()"


def test_vit_second_order_maml_with_math_attention():
    """The trainer builds MAML's ViT with plain-op attention: the meta-gradient is second order
    (it differs from FOMAML's) and matches finite differences of the meta-loss."""
    from meta_kernels.meta import meta_loss
    torch.manual_seed(0)
    model = ViT(in_channels=1, image_size=14, n_way=3, dim=8, depth=1, heads=2, patch_size=7,
                attention="math").double()
    xs, ys = torch.randn(2, 3, 1, 14, 14, dtype=torch.float64), torch.randint(0, 3, (2, 3))
    xq, yq = torch.randn(2, 4, 1, 14, 14, dtype=torch.float64), torch.randint(0, 3, (2, 4))
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    cfg = MAMLConfig(algo="maml", inner_steps=1, inner_lr=0.5, inner_clip=None, engine="custom")
    loss = meta_loss(params, (xs, ys, xq, yq), config=cfg, model=model, track_curve=False).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    name, p = "head.weight", params["head.weight"]
    direction = torch.randn_like(p)
    eps = 1e-6
    shifted = lambda s: meta_loss({**params, name: (p + s * eps * direction).detach().requires_grad_()},
                                  (xs, ys, xq, yq), config=cfg, model=model, track_curve=False).loss.detach()
    fd = (shifted(1) - shifted(-1)) / (2 * eps)
    analytic = (grads[list(params).index(name)] * direction).sum()
    torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-8)
    fo = meta_loss(params, (xs, ys, xq, yq), config=cfg.replace(algo="fomaml"), model=model, track_curve=False).loss
    (fo_grad,) = torch.autograd.grad(fo, [p])
    assert not torch.allclose(grads[list(params).index(name)], fo_grad)
    with pytest.raises(ValueError, match="attention"):
        ViT(in_channels=1, image_size=14, n_way=3, dim=8, depth=1, heads=2, patch_size=7, attention="flash")
