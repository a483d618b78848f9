"""The task-batching engine (meta_kernels.meta.batching) on users' own models: T tasks through
the model's unchanged forward give the same outputs and the same MAML / FOMAML meta-gradients
(float64, <= 1e-10) as a per-task loop written here, for a Sequential Conv4, a ResNet-12, an MLP
with Dropout, a LayerNorm / GroupNorm model, a frozen body, two inputs (one a keyword) and a
transformer encoder block; unknown layers fall back to vmap or a loop for that layer alone."""
import copy
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta_kernels.meta.batching import BatchedModel
from meta_kernels.meta.task_model import explain
from meta_kernels.models import ResNet12, sequential_conv4

F64 = dict(dtype=torch.float64)


def seq_conv4(channels=1, filters=8, n_way=5):
    return sequential_conv4(n_way, channels, filters)


def small_resnet12(widths=(4, 6, 8, 10), n_way=5):
    return ResNet12(n_way, widths)


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, stride=2, padding=2, dilation=2)
        self.gn = nn.GroupNorm(2, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = F.gelu(self.gn(self.conv(x))).mean(-1)
        return self.out(torch.tanh(self.ln(h)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(8, 2)

    def forward(self, x, *, tokens):
        return self.b(torch.cat([F.relu(self.a(x)), self.emb(tokens).mean(1)], dim=1))


class Scale(nn.Module):
    """A layer the engine does not know (a parameter used directly)."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.w


class Encoder(nn.Module):
    """A pre-norm transformer encoder block written out (torch's fused attention kernels have no
    double backward on the CPU): second order through softmax attention."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(3, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        h = self.inp(x)
        B, L, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5, dim=-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(B, L, D))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


class TorchEncoder(nn.Module):
    """torch's own TransformerEncoderLayer: its MultiheadAttention is a layer the engine runs under
    vmap (first order here: torch's CPU attention kernel has no double backward)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(self.inp(x)).mean(1))


class ChainBlock(nn.Module):
    """learn2learn's ConvBlock shape: a forward that runs its children one after the other."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(c_out), nn.ReLU()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)  # registered after, runs first

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + F.relu(self.conv(x))


class ChainedBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(ChainBlock(1, 4), ChainBlock(4, 6), ResidualBlock(6), ChainBlock(6, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


def one_channel_net():
    """higher's example network's shape: Conv2d(1, C, 3) without padding -> BatchNorm (momentum 1) ->
    ReLU -> MaxPool, then a dilated, strided conv (one input channel per task: the unfold path)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=1.0), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
                         nn.Conv2d(4, 1, 1), nn.Tanh(), nn.Conv2d(1, 3, 3, stride=2, padding=2, dilation=2, bias=False),
                         nn.Flatten(), nn.Linear(3 * 3 * 3, 3))


def _frozen_body():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    return model


# (model factory, inputs of one task: (args, kwargs), classes)
CASES = {
    "seq_conv4": (seq_conv4, lambda g: ((torch.rand(6, 1, 28, 28, generator=g, **F64),), {}), 5),
    "resnet12": (small_resnet12, lambda g: ((torch.randn(5, 3, 16, 16, generator=g, **F64),), {}), 5),
    "mlp_dropout": (lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)),
                    lambda g: ((torch.randn(7, 4, generator=g, **F64),), {}), 3),
    "layer_group_norm": (NormNet, lambda g: ((torch.randn(6, 3, 11, generator=g, **F64),), {}), 3),
    "frozen_body": (_frozen_body, lambda g: ((torch.randn(6, 4, generator=g, **F64),), {}), 3),
    "two_inputs_kw": (TwoInputs, lambda g: ((torch.randn(6, 3, generator=g, **F64),),
                                            {"tokens": torch.randint(0, 11, (6, 5), generator=g)}), 2),
    "unknown_layer": (lambda: nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)),
                      lambda g: ((torch.randn(6, 4, generator=g, **F64),), {}), 3),
    "one_channel_input": (one_channel_net, lambda g: ((torch.randn(5, 1, 12, 12, generator=g, **F64),), {}), 3),
    "chained_blocks": (ChainedBlocks, lambda g: ((torch.randn(5, 1, 12, 12, generator=g, **F64),), {}), 3),
    "transformer": (Encoder, lambda g: ((torch.randn(4, 5, 3, generator=g, **F64),), {}), 4),
    "torch_transformer_layer": (TorchEncoder, lambda g: ((torch.randn(4, 5, 3, generator=g, **F64),), {}), 4),
}


def _task_inputs(make, T, seed):
    g = torch.Generator().manual_seed(seed)
    tasks = [make(g) for _ in range(T)]
    args = tuple(torch.stack([t[0][i] for t in tasks]) for i in range(len(tasks[0][0])))
    kwargs = {k: torch.stack([t[1][k] for t in tasks]) for k in tasks[0][1]}
    labels = torch.randint(0, 2, (T, args[0].shape[1]), generator=g)
    return args, kwargs, labels


def _maml(forward, params, adapted_names, labels, steps, first_order, lr=0.1):
    """Per-task MAML with `forward(fast) -> logits [T, N, K]`: inner SGD on the support loss, the
    query loss (here the same batch) after the last step; returns the meta-gradient."""
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(forward(fast).flatten(0, 1), labels.flatten(), reduction="sum")
        names = [k for k in adapted_names]
        grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=not first_order)
        fast = {**fast, **{k: fast[k] - lr * g for k, g in zip(names, grads)}}
    loss = F.cross_entropy(forward(fast).flatten(0, 1), labels.flatten(), reduction="sum")
    leaves = [v for v in params.values() if v.requires_grad]
    return torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("steps", [2, 3])
def test_meta_gradients_equal_a_per_task_loop(case, first_order, steps):
    factory, make, _ = CASES[case]
    torch.manual_seed(0)
    model = factory().double()
    T = 3
    args, kwargs, labels = _task_inputs(make, T, seed=1)
    engine = BatchedModel(model)
    adapted = [k for k, v in model.named_parameters() if v.requires_grad]
    frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}

    def base():  # per-task copies of the adapted weights (the leaves), the frozen ones shared
        g = torch.Generator().manual_seed(2)
        return {k: (v.detach().expand(T, *v.shape) + 0.05 * torch.randn(T, *v.shape, generator=g, **F64)
                    ).requires_grad_() if k in adapted else v for k, v in model.named_parameters()}

    def batched(fast):
        torch.manual_seed(3)  # the same dropout masks: the folded batch draws what the loop draws task by task
        return engine(fast, args, kwargs, double_backward=not first_order)[..., :2]

    def loop(fast):
        torch.manual_seed(3)
        outs = [functional_call(model, {k: (v[t] if k in adapted else v) for k, v in fast.items()},
                                tuple(a[t] for a in args), {k: v[t] for k, v in kwargs.items()}) for t in range(T)]
        return torch.stack(outs)[..., :2]

    if case == "torch_transformer_layer" and not first_order:
        pytest.skip("torch's CPU attention kernel has no double backward (not ours to batch)")
    got = _maml(batched, base(), adapted, labels, steps, first_order)
    want = _maml(loop, base(), adapted, labels, steps, first_order)
    assert len(got) == len(adapted) and not frozen or all(k not in adapted for k in frozen)
    for name, a, b in zip(adapted, got, want):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= 1e-10 * scale, f"{case} {name}: {(a - b).abs().max().item():.2e}"
        assert a.abs().max() > 0 or "bias" in name, f"{case} {name}: no meta-gradient"


def test_outputs_match_a_per_task_loop_with_dropout_in_eval_and_masks_differ_in_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 1)).double()
    engine = BatchedModel(model)
    x = torch.randn(3, 5, 4, **F64)
    params = {k: v.detach().expand(3, *v.shape) for k, v in model.named_parameters()}  # identical tasks
    model.train()
    out = engine(params, (x.expand(3, 5, 4).contiguous()[:1].expand(3, 5, 4),))
    assert not torch.equal(out[0], out[1]), "every task draws its own dropout mask"
    model.eval()
    out = engine(params, (x,))
    want = torch.stack([functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],)) for t in range(3)])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_batch_norm_statistics_never_mix_tasks():
    """Shifting one task's inputs changes no other task's outputs."""
    torch.manual_seed(0)
    model = seq_conv4().double()
    engine = BatchedModel(model)
    params = {k: v.detach().expand(3, *v.shape) for k, v in model.named_parameters()}
    x = torch.rand(3, 4, 1, 28, 28, **F64)
    out = engine(params, (x,))
    x2 = x.clone()
    x2[1] = x2[1] * 5 + 3
    out2 = engine(params, (x2,))
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]], rtol=0, atol=1e-12)


def test_running_statistics_follow_a_per_task_loop_and_eval_uses_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.5)).double()
    loop = copy.deepcopy(model)
    engine = BatchedModel(model)
    params = {k: v.detach().expand(2, *v.shape) for k, v in model.named_parameters()}
    x = torch.randn(2, 6, 1, 8, 8, **F64)
    engine(params, (x,))
    for t in range(2):  # the tasks as successive batches, in task order
        loop(x[t])
    for a, b in zip(model.buffers(), loop.buffers()):
        torch.testing.assert_close(a, b)
    h = torch.stack([F.conv2d(x[t], model[0].weight, model[0].bias) for t in range(2)])
    torch.testing.assert_close(model[1].running_mean, 0.25 * h[0].mean((0, 2, 3)) + 0.5 * h[1].mean((0, 2, 3)))
    model.eval()
    before = model[1].running_mean.clone()
    out = engine(params, (x,))
    assert torch.equal(model[1].running_mean, before), "evaluation leaves the running statistics unchanged"
    want = torch.stack([model(x[t]) for t in range(2)])
    torch.testing.assert_close(out, want)


def test_explain_lists_how_each_layer_runs():
    text = explain(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), Scale(2)))
    assert "0: Conv2d -> batched" in text and "1: BatchNorm2d -> batched (fused batch_norm op)" in text
    assert "2: ReLU -> as is" in text and "3: Scale -> vmap" in text
    text = explain(seq_conv4())
    assert "0: Conv2d -> fused op conv3x3_bn_pool_relu" in text and "3: MaxPool2d -> fused op conv3x3_bn_pool_relu" in text
    assert "4: Conv2d -> batched" in text and "5: BatchNorm2d -> fused op batch_norm" in text
    assert "7: MaxPool2d -> fused op max_pool2x2_relu" in text and "17: Linear -> batched" in text


class NotVmappable(nn.Module):
    """A layer torch.func.vmap cannot run (data-dependent control flow on a tensor value)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w if float(x.sum()) > -1e9 else x


def test_a_layer_vmap_cannot_run_falls_back_to_a_loop_for_that_layer_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), NotVmappable(), nn.Linear(3, 2)).double()
    engine = BatchedModel(model)
    params = {k: (v.detach().expand(2, *v.shape) + torch.randn(2, *v.shape, **F64)).requires_grad_()
              for k, v in model.named_parameters()}
    x = torch.randn(2, 4, 2, **F64)
    with pytest.warns(UserWarning, match=r"layer 1 \(NotVmappable\) cannot run under vmap"):
        out = engine(params, (x,))
    want = torch.stack([functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],)) for t in range(2)])
    torch.testing.assert_close(out, want)


def test_a_layer_that_cannot_run_names_itself():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            raise RuntimeError("nope")

    model = nn.Sequential(nn.Linear(2, 3), Broken())
    params = {k: v.detach().expand(2, *v.shape) for k, v in model.named_parameters()}
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"layer 1 \(Broken\) can be neither batched"):
        BatchedModel(model)(params, (torch.randn(2, 4, 2),))


def test_inputs_without_the_task_dim_are_refused():
    model = nn.Linear(2, 2)
    params = {k: v.detach().expand(3, *v.shape) for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=r"every input must be \[T, N, \.\.\.\] with T = 3"):
        BatchedModel(model)(params, (torch.randn(3, 4, 2), torch.randn(2, 4)))


class MixesSamples(nn.Module):
    """Centres its features with the batch mean: the folded batch would mix tasks."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0)


def test_a_forward_that_mixes_tasks_is_caught_by_the_debug_check():
    import meta_kernels as mk
    from meta_kernels.meta.batching import TaskMixingError, check_task_independence
    x = torch.randn(3, 4, 3)
    with pytest.raises(TaskMixingError, match=r"mixes samples across the batch.*task_batching='loop'"):
        check_task_independence(MixesSamples(), x)
    check_task_independence(seq_conv4(), torch.rand(3, 4, 1, 28, 28))  # the known layers never mix tasks
    learner = mk.MetaLearner(MixesSamples(), mk.MAMLConfig(inner_steps=1), debug_batching=True)
    with pytest.raises(TaskMixingError):
        learner.step((x, torch.randint(0, 2, (3, 4)), x, torch.randint(0, 2, (3, 4))))


def test_blocks_whose_forward_chains_their_children_keep_the_tasks_in_the_channels(monkeypatch):
    """A user's block whose forward only chains its children (learn2learn's ConvBlock) runs like an
    nn.Sequential: the tasks stay side by side in the channels from one block to the next; a
    residual block (not a chain) converts on its own."""
    from meta_kernels.meta import batching
    model = ChainedBlocks().double()
    assert batching._chain(model.blocks[0]) == ["conv", "bn", "relu"]
    assert batching._chain(model.blocks) == ["0", "1", "2", "3"]
    assert batching._chain(model) is None  # a mean between its children
    assert batching._chain(model.blocks[2]) is None  # x + relu(conv(x))
    conversions = []
    original = batching._to_channels
    monkeypatch.setattr(batching, "_to_channels", lambda x, T: conversions.append(1) or original(x, T))
    x = torch.randn(3, 5, 1, 12, 12, **F64)
    params = {k: v.detach().expand(3, *v.shape) + 0.01 * torch.randn(3, *v.shape, **F64)
              for k, v in model.named_parameters()}
    out = BatchedModel(model)(params, (x,))
    # before block 0, the residual block's own conv, block 3 (block by block: 4)
    assert len(conversions) == 3
    want = torch.stack([functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],)) for t in range(3)])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_one_input_channel_per_task_runs_as_patches_times_weights(monkeypatch):
    """On the CPU a conv of one input channel per task runs as unfold + a batched matmul (what it
    computes is checked against the per-task loop in test_meta_gradients_equal_a_per_task_loop)."""
    from meta_kernels.meta import batching
    calls = []
    real = batching._single_channel_conv
    monkeypatch.setattr(batching, "_single_channel_conv", lambda *a: calls.append(a[0].shape) or real(*a))
    model = one_channel_net().double()
    args, kwargs, _ = _task_inputs(CASES["one_channel_input"][1], 3, seed=1)
    params = {k: v.expand(3, *v.shape) for k, v in model.named_parameters()}
    BatchedModel(model)(params, args, kwargs, double_backward=True)
    assert [list(s) for s in calls] == [[5, 3, 12, 12], [5, 3, 5, 5]]
