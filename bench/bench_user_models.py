"""Users' own models (no forward_tasks) on the task-batching engine: one outer step of ours against
a plain per-task functional_call loop and higher with the same model, in the same run and in
alternation (shared-machine noise hits all alike).

Cases (inner lr 0.4 classification / 0.01 regression, Adam 1e-3, no inner clipping):
  seq_conv4     the peers' Conv4 written as a plain nn.Sequential (Conv2d 3x3 -> BatchNorm2d(
                track_running_stats=False) -> ReLU -> MaxPool2d(2), x4, Flatten, Linear), Omniglot
                28x28 5-way 1-shot 15-query, meta-batch 32, 5 inner steps; also mk.Conv4 (hand path)
  resnet12      MetaOptNet's ResNet-12 (64-160-320-640), 32x32 RGB (CIFAR-FS shape), 5-way 1-shot
                15-query, meta-batch 4, 5 inner steps
  mlp_dropout   a 40-40 MLP with Dropout(0.1) on sinusoid regression (10 support, 10 query points),
                meta-batch 25, 5 inner steps
  lstm / bigru / transformer   sequence classifiers (meta_kernels.models.plain: an LSTM on its last
                hidden state, a 2-layer bidirectional GRU, a 2-layer nn.TransformerEncoder with mean
                pooling) on random sequences [length 20, 16 features], 5-way 1-shot 5-query,
                meta-batch 16, 2 inner steps (issue 33)
  bert_lora     a tiny BERT (hidden 32, 2 layers) with LoRA adapters (peft; the base frozen) on random
                token ids [length 16], 5-way 1-shot 5-query, meta-batch 16, 2 inner steps
  omniglot_fc / mlp   learn2learn's OmniglotFC (Linear -> BatchNorm1d -> ReLU x4) and a 784-256-128-5
                MLP, Omniglot 28x28 5-way 1-shot 15-query, meta-batch 32, 1 inner step of lr 0.5 (its
                maml_omniglot example); also ours-dense (the inner loop without factored Linear steps)
Implementations: ours (MetaLearner, defaults), ours-dense (factored Linear steps off), ours-lowmem (task_chunk / query_chunk, and
recompute_inner for MAML), ours-loop (the same MetaLearner with task_batching='loop': batching off),
plain-loop, higher (where installed; its attention on the math kernel, as plain torch needs for
second order).

Time:   pytest bench/bench_user_models.py --benchmark-json=bench/results/user_models.json
        python bench/summarize.py bench/results/user_models.json
Memory: python bench/bench_user_models.py --memory   (each implementation in a fresh process:
        RSS growth of one step and the peak of tensor memory allocated during a second)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import meta_kernels as mk
from meta_kernels.meta import inner
from meta_kernels.models import ResNet12, peers, sequential_conv4
from meta_kernels.models.plain import BiGRUClassifier, LSTMClassifier, TransformerClassifier, tiny_bert_lora
from torch.nn.attention import SDPBackend, sdpa_kernel
from _common import higher_outer_step, interleaved_medians, machine, step_memory

HERE = Path(__file__).resolve().parent
META_LR = 1e-3
if torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = "cpu"
    mk.keep_freed_cpu_memory()  # as the trainer does on CPUs


def mlp_dropout():
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Dropout(0.1), nn.Linear(40, 40), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(40, 1))


# case -> (model factory, T, batch maker, inner lr, loss name, low-memory settings)
def _classification(T, shape, n_way=5, k=1, q=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.rand(T, n_way * k, *shape, generator=g), torch.rand(T, n_way * q, *shape, generator=g)
    ys = torch.arange(n_way).repeat_interleave(k).repeat(T, 1)
    yq = torch.arange(n_way).repeat_interleave(q).repeat(T, 1)
    return tuple(t.to(DEVICE) for t in (xs, ys, xq, yq))


def _sinusoid(T, k=10, q=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    amp, phase = torch.rand(T, 1, 1, generator=g) * 4.9 + 0.1, torch.rand(T, 1, 1, generator=g) * torch.pi
    xs, xq = torch.rand(T, k, 1, generator=g) * 10 - 5, torch.rand(T, q, 1, generator=g) * 10 - 5
    return tuple(t.to(DEVICE) for t in (xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)))


def _tokens(T, length=16, vocab=100, n_way=5, k=1, q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: {"input_ids": torch.randint(0, vocab, (T, n_way * n, length), generator=g).to(DEVICE)}
    labels = lambda n: torch.arange(n_way).repeat_interleave(n).repeat(T, 1).to(DEVICE)
    return ids(k), labels(k), ids(q), labels(q)


SEQ = (20, 16)  # sequence length, features
CASES = {
    "seq_conv4": (sequential_conv4, lambda: _classification(32, (1, 28, 28)), 0.4, "cross_entropy",
                  {"task_chunk": 8, "query_chunk": 1}),
    "resnet12": (ResNet12, lambda: _classification(4, (3, 32, 32)), 0.4, "cross_entropy",
                 {"task_chunk": 1, "query_chunk": 1}),
    "mlp_dropout": (mlp_dropout, lambda: _sinusoid(25), 0.01, "mse", {}),
    "lstm": (lambda: LSTMClassifier(SEQ[1], 5, hidden=32), lambda: _classification(16, SEQ, q=5), 0.4,
             "cross_entropy", {}),
    "bigru": (lambda: BiGRUClassifier(SEQ[1], 5, hidden=32), lambda: _classification(16, SEQ, q=5), 0.4,
              "cross_entropy", {}),
    "transformer": (lambda: TransformerClassifier(SEQ[1], 5, dim=32), lambda: _classification(16, SEQ, q=5), 0.4,
                    "cross_entropy", {}),
    "bert_lora": (lambda: tiny_bert_lora(5, vocab=100, hidden=32, layers=2, heads=4), lambda: _tokens(16), 0.4,
                  "cross_entropy", {}),
    "omniglot_fc": (peers.OmniglotFC, lambda: _classification(32, (1, 28, 28)), 0.5, "cross_entropy", {}),
    "mlp": (peers.mlp, lambda: _classification(32, (1, 28, 28)), 0.5, "cross_entropy", {}),
}
SEQUENCE_CASES = ("lstm", "bigru", "transformer", "bert_lora")
STEPS = {**{case: 2 for case in SEQUENCE_CASES}, "omniglot_fc": 1, "mlp": 1}  # inner steps; 5 for the others
FACTORABLE_CASES = ("omniglot_fc", "mlp")  # wide Linear layers: the inner loop's factored steps apply


def _model(case):
    torch.manual_seed(0)
    return CASES[case][0]().to(DEVICE)


def ours(case, algo, lowmem=False, model=None, task_batching="auto"):
    _, _, lr, loss, low = CASES[case]
    settings = dict(low, recompute_inner=algo == "maml" and bool(low)) if lowmem else {}
    cfg = mk.MAMLConfig(algo=algo, inner_steps=STEPS.get(case, 5), inner_lr=lr, inner_clip=None, meta_lr=META_LR,
                        loss=loss, **settings)
    learner = mk.MetaLearner(model or _model(case), cfg, task_batching=task_batching)
    return lambda batch: learner.step(batch)


def ours_dense(case, algo):
    """ours with the inner loop's factored Linear steps switched off (every weight [T, *shape])."""
    step = ours(case, algo)

    def dense(batch):
        inner.FACTORED = False
        try:
            return step(batch)
        finally:
            inner.FACTORED = True
    return dense


def ours_conv4(case, algo):
    return ours(case, algo, model=mk.Conv4.omniglot(5).to(DEVICE))


def _loss(case):
    return F.cross_entropy if CASES[case][3] == "cross_entropy" else F.mse_loss


def plain_loop(case, algo):
    model, lr, loss, steps = _model(case), CASES[case][2], _loss(case), STEPS.get(case, 5)
    opt = torch.optim.Adam(model.parameters(), lr=META_LR)
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}

    def step(batch):
        xs, ys, xq, yq = batch
        T = ys.shape[0]
        opt.zero_grad()
        with sdpa_kernel(SDPBackend.MATH):  # plain torch's attention kernels have no double backward
            for t in range(T):
                fast = params
                for _ in range(steps):
                    grads = torch.autograd.grad(loss(_call(model, fast, xs, t), ys[t]), list(fast.values()),
                                                create_graph=algo == "maml")
                    fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
                (loss(_call(model, fast, xq, t), yq[t]) / T).backward()
        opt.step()
    return step


def _call(model, params, x, t):
    """The model's logits for task t of an input batch (a tensor, or keyword inputs)."""
    out = functional_call(model, params, (), {k: v[t] for k, v in x.items()}) if isinstance(x, dict) else \
        functional_call(model, params, (x[t],))
    return getattr(out, "logits", out)


def with_higher(case, algo):
    step = higher_outer_step(_model(case), _loss(case), CASES[case][2], META_LR, algo, STEPS.get(case, 5))

    def math_attention(batch):
        with sdpa_kernel(SDPBackend.MATH):
            return step(batch)
    return math_attention


def implementations(case, algo) -> dict:
    impls = {"ours": ours(case, algo)}
    if CASES[case][4]:
        impls["ours-lowmem"] = ours(case, algo, lowmem=True)
    if case in FACTORABLE_CASES:
        impls["ours-dense"] = ours_dense(case, algo)
    if case in SEQUENCE_CASES:
        impls["ours-loop"] = ours(case, algo, task_batching="loop")
    if case == "seq_conv4":
        impls["mk.Conv4"] = ours_conv4(case, algo)
    impls["plain-loop"] = plain_loop(case, algo)
    # higher 0.2.1 cannot patch a peft model (its patched class has no consistent method order).
    if importlib.util.find_spec("higher") is not None and case != "bert_lora":
        impls["higher"] = with_higher(case, algo)
    return impls


PARAMS = [(c, a) for c in CASES for a in ("maml", "fomaml")]


@pytest.mark.parametrize("case,algo", PARAMS, ids=[f"{c}-{a}" for c, a in PARAMS])
def test_outer_step(benchmark, case, algo):
    benchmark.group = f"{case} {algo}"
    batch = CASES[case][1]()
    impls = {k: (lambda fn=fn: fn(batch)) for k, fn in implementations(case, algo).items()}
    heavy = case in ("resnet12", "bert_lora")
    medians = interleaved_medians(impls, rounds=2 if heavy else 3, inner=1, warmup=1)
    benchmark.extra_info.update({"machine": machine(), "median_s": medians,
                                 "speedup_vs": {k: v / medians["ours"] for k, v in medians.items() if k != "ours"}})
    benchmark.pedantic(impls["ours"], rounds=1, iterations=1)


def _child(case, algo, impl) -> None:
    batch = CASES[case][1]()
    fn = implementations(case, algo)[impl]
    print(json.dumps(step_memory(lambda: fn(batch))))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--child", nargs=3, metavar=("CASE", "ALGO", "IMPL"))
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    print("| case | algorithm | implementation | RSS growth, GB | peak allocated, GB |\n|---|---|---|---:|---:|")
    for case in args.cases:
        for algo in ("maml", "fomaml"):
            for impl in implementations(case, algo):
                out = subprocess.run([sys.executable, __file__, "--child", case, algo, impl], capture_output=True,
                                     text=True, check=True, cwd=HERE)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {case} | {algo} | {impl} | {row['rss_gb']:.3f} | {row['allocated_gb']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
