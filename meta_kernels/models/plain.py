"""Plain nn.Modules as users write them (no forward_tasks): the peers' Conv4 as an nn.Sequential,
MetaOptNet's ResNet-12, recurrent and attention classifiers, a tiny BERT with LoRA. They run their
tasks batched through the engine like any user model; the tests and benchmarks of the engine use
them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sequential_conv4(n_way: int = 5, in_channels: int = 1, filters: int = 64) -> nn.Sequential:
    """4 x [Conv2d 3x3, BatchNorm2d (batch statistics), ReLU, MaxPool2d(2)], Flatten, Linear: the
    Conv4 of learn2learn / higher users, for 28x28 inputs (1x1 features after four poolings)."""
    layers = []
    for i in range(4):
        layers += [nn.Conv2d(in_channels if i == 0 else filters, filters, 3, padding=1),
                   nn.BatchNorm2d(filters, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, n_way))


class ResBlock(nn.Module):
    """MetaOptNet's ResNet-12 block: three 3x3 conv-BN(-LeakyReLU) layers, a 1x1 conv-BN shortcut,
    LeakyReLU after the sum, 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.c2, self.b2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.c3, self.b3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        h = F.leaky_relu(self.b1(self.c1(x)), 0.1)
        h = F.leaky_relu(self.b2(self.c2(h)), 0.1)
        h = self.b3(self.c3(h))
        return self.pool(F.leaky_relu(h + self.shortcut(x), 0.1))


class ResNet12(nn.Module):
    """Four ResBlocks (64-160-320-640 by default), global average pooling, a linear head."""

    def __init__(self, n_way: int = 5, widths: tuple[int, ...] = (64, 160, 320, 640), in_channels: int = 3):
        super().__init__()
        chans = (in_channels, *widths)
        self.blocks = nn.Sequential(*[ResBlock(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.head = nn.Linear(widths[-1], n_way)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(x), 1).flatten(1))


# ---- sequence models: recurrent and attention classifiers, a Hugging Face model with LoRA ----------

class LSTMClassifier(nn.Module):
    """A batch_first LSTM over [N, length, features] and a linear head on its last hidden state."""

    def __init__(self, features: int, n_way: int = 5, hidden: int = 8):
        super().__init__()
        self.lstm, self.head = nn.LSTM(features, hidden, batch_first=True), nn.Linear(hidden, n_way)

    def forward(self, x):
        _, (h_n, _) = self.lstm(x)
        return self.head(h_n[-1])


class BiGRUClassifier(nn.Module):
    """A 2-layer bidirectional GRU, time first (batch_first=False), head on both last states."""

    def __init__(self, features: int, n_way: int = 5, hidden: int = 8):
        super().__init__()
        self.gru = nn.GRU(features, hidden, num_layers=2, bidirectional=True)
        self.head = nn.Linear(2 * hidden, n_way)

    def forward(self, x):
        out, h_n = self.gru(x.transpose(0, 1))
        return self.head(torch.cat([h_n[-2], h_n[-1]], -1)) + 0.1 * self.head(out[-1])


class RNNClassifier(nn.Module):
    """A vanilla ReLU RNN given its h_0, head on the last output."""

    def __init__(self, features: int, n_way: int = 5, hidden: int = 8):
        super().__init__()
        self.rnn, self.head = nn.RNN(features, hidden, batch_first=True, nonlinearity="relu"), nn.Linear(hidden, n_way)

    def forward(self, x):
        out, _ = self.rnn(x, torch.zeros(1, x.shape[0], self.rnn.hidden_size, dtype=x.dtype, device=x.device))
        return self.head(out[:, -1])


class TransformerClassifier(nn.Module):
    """A linear embedding, a 2-layer nn.TransformerEncoder (batch_first), mean pooling, a head."""

    def __init__(self, features: int, n_way: int = 5, dim: int = 16, heads: int = 4, layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, n_way)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def tiny_bert_lora(n_way: int = 5, vocab: int = 50, hidden: int = 16, layers: int = 1, heads: int = 2,
                   max_length: int = 32, rank: int = 2):
    """A tiny BertForSequenceClassification built from a config (no download) with LoRA adapters
    on its query and value projections (peft); the classifier is trained too, the base is frozen."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=max_length, num_labels=n_way,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return get_peft_model(BertForSequenceClassification(config),
                          LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], lora_dropout=0.0,
                                     modules_to_save=["classifier"]))


def tiny_gpt2(n_way: int = 5, vocab: int = 50, hidden: int = 16, layers: int = 1, heads: int = 2, max_length: int = 32):
    """A tiny GPT2ForSequenceClassification built from a config (no download); token 0 pads."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_length,
                        num_labels=n_way, pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2ForSequenceClassification(config)
