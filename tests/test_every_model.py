"""Models users bring beyond convnets: recurrent nets, attention, structured outputs, a forward that
reads a layer's weight, a tiny BERT with LoRA. Their float64 meta-gradients through the engine
equal a per-task loop written here (the math attention kernel, as plain torch needs for double
backward), for MAML, FOMAML and ANIL-style partial adaptation; and explain() says what a step did."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import meta_kernels as mk
from meta_kernels.meta import meta_loss
from meta_kernels.models.plain import (BiGRUClassifier, LSTMClassifier, RNNClassifier, TransformerClassifier,
                                       tiny_bert_lora, tiny_gpt2)

F64 = torch.float64
WAYS, T, N, L, D, VOCAB = 3, 3, 4, 5, 6, 50


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Flatten(), nn.Linear(L * D, 16), nn.Tanh()), nn.Linear(16, WAYS)

    def forward(self, x):
        features = self.body(x)
        return {"features": features, "logits": self.head(features)}


class ReadsHeadWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Flatten(), nn.Linear(L * D, 16), nn.Tanh()), nn.Linear(16, WAYS)

    def forward(self, x):
        return self.body(x) @ self.head.weight.t() + self.head.bias


def bert_lora():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return tiny_bert_lora(WAYS, vocab=VOCAB)


def gpt2():
    pytest.importorskip("transformers")
    return tiny_gpt2(WAYS, vocab=VOCAB)


@dataclasses.dataclass
class Output:
    features: torch.Tensor
    logits: torch.Tensor


class DataclassModel(DictModel):
    def forward(self, x):
        out = super().forward(x)
        return Output(out["features"], out["logits"])


class DecoderModel(nn.Module):
    """nn.TransformerDecoderLayer attending to its own embedded sequence as memory."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(D, 8), nn.Linear(8, WAYS)
        self.decoder = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.decoder(h, h).mean(1))


class UserSDPA(nn.Module):
    """Attention written in the user's forward with F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(D, 3 * 8), nn.Linear(8, WAYS)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return self.head(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).mean(1))


MODELS = {"lstm": lambda: LSTMClassifier(D, WAYS), "bigru": lambda: BiGRUClassifier(D, WAYS),
          "rnn": lambda: RNNClassifier(D, WAYS), "transformer": lambda: TransformerClassifier(D, WAYS),
          "transformer_eval": lambda: TransformerClassifier(D, WAYS), "decoder": DecoderModel,
          "decoder_eval": DecoderModel, "user_sdpa": UserSDPA, "dict": DictModel,
          "dataclass": DataclassModel, "reads_head_weight": ReadsHeadWeight, "bert_lora": bert_lora, "gpt2": gpt2}
TOKENS = ("bert_lora", "gpt2")


def task_batch(name):
    g = torch.Generator().manual_seed(1)
    if name in TOKENS:
        x = lambda: {"input_ids": torch.randint(1, VOCAB, (T, N, L), generator=g)}
    else:
        x = lambda: torch.randn(T, N, L, D, generator=g, dtype=F64)
    y = lambda: torch.randint(0, WAYS, (T, N), generator=g)
    return x(), y(), x(), y()


def logits(out):
    return out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)


def per_task_loop(model, params, batch, algo, adapted, steps=2, lr=0.3):
    """The meta-objective the plain way: one task at a time, torch.func.functional_call, the mean
    of the query losses after `steps` SGD steps on the adapted weights."""
    xs, ys, xq, yq = batch
    call = lambda p, x: logits(functional_call(model, p, (), x) if isinstance(x, dict)
                               else functional_call(model, p, (x,)))
    pick = lambda x, t: {k: v[t] for k, v in x.items()} if isinstance(x, dict) else x[t]
    total = 0.0
    with sdpa_kernel(SDPBackend.MATH):
        for t in range(T):
            fast = dict(params)
            for _ in range(steps):
                loss = F.cross_entropy(call(fast, pick(xs, t)), ys[t])
                names = [k for k in fast if k in adapted]
                grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=algo == "maml")
                fast.update({k: fast[k] - lr * (g if algo == "maml" else g.detach()) for k, g in zip(names, grads)})
            total = total + F.cross_entropy(call(fast, pick(xq, t)), yq[t])
    return total / T


@pytest.mark.parametrize("algo", ["maml", "fomaml", "anil"])
@pytest.mark.parametrize("name", list(MODELS))
def test_meta_gradients_equal_a_per_task_loop(name, algo):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    if name.endswith("_eval"):
        model.eval()
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    if algo == "anil":
        adapted = [k for k in params if any(part in k for part in ("head", "classifier", "score"))]
    else:
        adapted = list(params)
    batch = task_batch(name)
    config = mk.MAMLConfig(algo="fomaml" if algo == "fomaml" else "maml", inner_steps=2, inner_lr=0.3,
                           inner_clip=None)
    reference = torch.autograd.grad(per_task_loop(model, params, batch, "fomaml" if algo == "fomaml" else "maml",
                                                  adapted), list(params.values()))
    out = meta_loss(params, batch, config=config, model=model, adapt_params=adapted, track_curve=False)
    ours = torch.autograd.grad(out.loss, list(params.values()))
    for k, a, b in zip(params, ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=k)
    if name == "bert_lora":  # the base stays frozen: only LoRA and the classifier are trained
        assert all(("lora_" in k or "classifier" in k) for k in params)


@pytest.mark.parametrize("name", list(MODELS))
def test_explain_says_what_a_step_did(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    batch = task_batch(name)
    told = mk.explain(copy.deepcopy(model), batch[0])
    learner = mk.MetaLearner(model, mk.MAMLConfig(inner_steps=1, inner_lr=0.1, inner_clip=None))
    with pytest.warns(UserWarning, match="reads head.weight itself") if name == "reads_head_weight" else _nothing():
        learner.step(batch)
    assert told.splitlines() == learner.task_model.explain()
    if name in ("lstm", "bigru", "rnn"):
        assert "one recurrence for all tasks" in told
    if name.startswith(("transformer", "decoder", "user_sdpa")) or name in TOKENS:
        assert "vmap" not in told and "loop" not in told


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_explain_with_a_config_names_the_engine_and_the_clipping():
    text = mk.explain(DictModel(), config=mk.MAMLConfig())
    assert "engine custom (auto)" in text and "inner_clip 10.0" in text and "inner_clip=None" in text
    assert "on the output's logits" in text


def test_packed_sequences_are_refused_with_what_to_pass():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(D, 8, batch_first=True), nn.Linear(8, WAYS)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, [L] * x.shape[0], batch_first=True)
            return self.head(self.lstm(packed)[1][0][-1])
    learner = mk.MetaLearner(Packed().double(), mk.MAMLConfig(inner_steps=1, inner_lr=0.1), debug_batching=False)
    with pytest.raises(ValueError, match="PackedSequence cannot be split into tasks; pass the padded batch"):
        learner.step(task_batch("lstm"))


def test_the_default_clipping_says_once_when_it_changes_an_update(monkeypatch):
    from meta_kernels.meta import inner
    monkeypatch.setattr(inner, "_CLIP_SAID", False)
    model = DictModel().double()
    batch = task_batch("dict")
    learner = mk.MetaLearner(model, mk.MAMLConfig(inner_steps=1, inner_lr=0.1, inner_clip=1e-3))
    with pytest.warns(UserWarning, match=r"inner_clip=0.001 scaled down an inner update .* inner_clip=None"):
        learner.step(batch)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        learner.step(batch)
        mk.MetaLearner(DictModel().double(), mk.MAMLConfig(inner_steps=1, inner_lr=0.1, inner_clip=None)).step(batch)
