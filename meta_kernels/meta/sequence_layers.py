"""Task-aware recurrent and attention layers for the task-batching engine (meta/batching.py
registers them among its known layers): every task with its own weights ([T, *shape]) over the
tasks' samples folded into one batch, correct to second order (plain differentiable ops).

- nn.RNN / nn.LSTM / nn.GRU: any number of layers, bidirectional, batch_first either way, with or
  without h_0, dropout between layers. The input projection of every time step is one batched
  matmul over the tasks; the recurrence is one batched matmul per time step for all tasks and
  directions' gates together. Outputs as torch gives them: output, h_n (and c_n), batch in the
  folded order. PackedSequence inputs are refused with what to pass instead.
- nn.MultiheadAttention: per-task in / out projections as batched matmuls, the attention itself
  per sample (scaled_dot_product_attention, whose kernel the engine picks: the math kernel when
  the pass is differentiated twice), masks as torch takes them, the averaged weights when asked.
(The transformer layers and stacks need nothing of their own: the engine turns off torch's fused
inference path for its passes, so they run layer by layer on these.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meta_kernels.meta.batching import _PASS, _per_task, _tasks_of


def _stacked(v: Tensor | None, dims: int, T: int) -> Tensor | None:
    """A weight as [T, *shape]: per task already, or shared and expanded."""
    if v is None:
        return None
    return v if _per_task(v, dims) else v.expand(T, *v.shape)


def _any_per_task(module) -> bool:
    return any(_per_task(getattr(module, name), dims) for name, dims in module._mk_base_dims.items())


# ---- recurrent layers ---------------------------------------------------------------------------

class _TaskRNN:
    """nn.RNN / nn.LSTM / nn.GRU with per-task weights."""
    plan = "batched (one recurrence for all tasks: a batched matmul per time step)"

    def forward(self, input, hx=None):
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise ValueError(f"layer {self._mk_name} ({type(self).__bases__[-1].__name__}): a PackedSequence cannot be "
                             "split into tasks; pass the padded batch (nn.utils.rnn.pad_packed_sequence) and take each "
                             "sequence's last valid output by its length, or run this model with task_batching='loop'")
        if not _any_per_task(self):  # every weight shared: torch's own kernel
            return self._mk_original_forward(input, hx)
        if getattr(self, "proj_size", 0):
            raise ValueError(f"layer {self._mk_name}: LSTM(proj_size > 0) has no per-task form here; drop proj_size or "
                             "run this model with task_batching='loop'")
        if input.dim() != 3:
            raise ValueError(f"layer {self._mk_name}: the batched form takes batched sequences (3-D input), got "
                             f"{list(input.shape)}")
        lstm, gru = self.mode == "LSTM", self.mode == "GRU"
        x = input if self.batch_first else input.transpose(0, 1)  # [B, L, F], B = T * N
        B, L = x.shape[:2]
        T = _tasks_of(self, B)
        N, D, H = B // T, 2 if self.bidirectional else 1, self.hidden_size
        x = x.reshape(T, N, L, x.shape[-1])
        if hx is None:
            h0 = x.new_zeros(self.num_layers * D, T, N, H)
            c0 = h0 if lstm else None
        else:
            h0, c0 = (hx if lstm else (hx, None))
            h0 = h0.reshape(self.num_layers * D, T, N, H)
            c0 = None if c0 is None else c0.reshape(self.num_layers * D, T, N, H)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih = _stacked(getattr(self, "weight_ih" + sfx), 2, T)
                w_hh = _stacked(getattr(self, "weight_hh" + sfx), 2, T)
                b_ih = _stacked(getattr(self, "bias_ih" + sfx, None), 1, T)
                b_hh = _stacked(getattr(self, "bias_hh" + sfx, None), 1, T)
                k = layer * D + d
                seq, h, c = _recur(x, w_ih, w_hh, b_ih, b_hh, h0[k], None if c0 is None else c0[k], self.mode,
                                   reverse=bool(d), nonlinearity=getattr(self, "nonlinearity", "tanh"))
                outs.append(seq)
                h_n.append(h)
                if lstm:
                    c_n.append(c)
            x = torch.cat(outs, -1) if D > 1 else outs[0]  # [T, N, L, D * H]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        output = x.reshape(B, L, D * H)
        if not self.batch_first:
            output = output.transpose(0, 1)
        h_n = torch.stack(h_n).reshape(self.num_layers * D, B, H)
        if lstm:
            return output, (h_n, torch.stack(c_n).reshape(self.num_layers * D, B, H))
        return output, h_n


def _recur(x: Tensor, w_ih, w_hh, b_ih, b_hh, h: Tensor, c: Tensor | None, mode: str, *, reverse: bool,
           nonlinearity: str):
    """One direction of one layer for all tasks: x [T, N, L, F], weights [T, ...], h / c [T, N, H].
    Returns (outputs [T, N, L, H], last h, last c)."""
    T, N, L, _ = x.shape
    # Every time step's input projection in one batched matmul: [T, N*L, F] @ [T, F, G*H].
    xw = torch.bmm(x.reshape(T, N * L, -1), w_ih.transpose(1, 2)).reshape(T, N, L, -1)
    if b_ih is not None:
        xw = xw + b_ih.unsqueeze(1).unsqueeze(1)
    w_hh_t = w_hh.transpose(1, 2)
    b_hh = None if b_hh is None else b_hh.unsqueeze(1)
    outs = []
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        gh = torch.bmm(h, w_hh_t)
        if b_hh is not None:
            gh = gh + b_hh
        gi = xw[:, :, t]
        if mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif mode == "GRU":
            i_r, i_z, i_n = gi.chunk(3, -1)
            h_r, h_z, h_n = gh.chunk(3, -1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            h = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
        else:
            h = (torch.tanh if nonlinearity == "tanh" else torch.relu)(gi + gh)
        outs.append(h)
    if reverse:
        outs.reverse()
    return torch.stack(outs, 2), h, c


# ---- attention -----------------------------------------------------------------------------------

class _TaskMultiheadAttention:
    """nn.MultiheadAttention with per-task projections."""
    plan = "batched (per-task projections; attention per sample, math kernel when differentiated twice)"

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        weights = (self.in_proj_weight, self.in_proj_bias, self.q_proj_weight, self.k_proj_weight,
                   self.v_proj_weight, self.out_proj.weight, self.out_proj.bias)
        if not any(w is not None and w.dim() == (3 if i != 1 and i != 6 else 2) for i, w in enumerate(weights)):
            return self._mk_original_forward(query, key, value, key_padding_mask=key_padding_mask,
                                             need_weights=need_weights, attn_mask=attn_mask,
                                             average_attn_weights=average_attn_weights, is_causal=is_causal)
        if query.dim() != 3:
            raise ValueError(f"layer {self._mk_name}: the batched form takes batched inputs (3-D), got {list(query.shape)}")
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError(f"layer {self._mk_name}: MultiheadAttention(add_bias_kv / add_zero_attn) has no per-task "
                             "form here; run this model with task_batching='loop'")
        q, k, v = (t if self.batch_first else t.transpose(0, 1) for t in (query, key, value))  # [B, L, E]
        B, Lq, E = q.shape
        T = _tasks_of(self, B)
        heads, hd = self.num_heads, E // self.num_heads
        if self._qkv_same_embed_dim:
            w = _stacked(self.in_proj_weight, 2, T)
            wq, wk, wv = w.chunk(3, 1)
        else:
            wq, wk, wv = (_stacked(t, 2, T) for t in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
        b = _stacked(self.in_proj_bias, 1, T)
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3, 1)

        def project(t: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
            out = torch.bmm(t.reshape(T, -1, t.shape[-1]), w.transpose(1, 2))
            if bias is not None:
                out = out + bias.unsqueeze(1)
            return out.reshape(B, -1, heads, hd).transpose(1, 2)  # [B, heads, L, hd]
        qh, kh, vh = project(q, wq, bq), project(k, wk, bk), project(v, wv, bv)
        mask = _attention_mask(attn_mask, key_padding_mask, B, heads, Lq, kh.shape[2], q.dtype, is_causal)
        dropout = self.dropout if self.training else 0.0
        if need_weights:  # the weights themselves are asked for: written out (softmax of the scores)
            scores = qh @ kh.transpose(-2, -1) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, -1)
            out = F.dropout(attn, dropout, self.training) @ vh
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(T, -1, E)
        out = torch.bmm(out, _stacked(self.out_proj.weight, 2, T).transpose(1, 2))
        if self.out_proj.bias is not None:
            out = out + _stacked(self.out_proj.bias, 1, T).unsqueeze(1)
        out = out.reshape(B, Lq, E)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(1) if average_attn_weights else attn


def _attention_mask(attn_mask, key_padding_mask, B: int, heads: int, Lq: int, Lk: int, dtype, is_causal: bool):
    """One additive float mask [B or 1, heads or 1, Lq, Lk] from torch's attn_mask ([Lq, Lk] or
    [B * heads, Lq, Lk], bool: True = not allowed, or float: added) and key_padding_mask ([B, Lk])."""
    def additive(m: Tensor) -> Tensor:
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)
    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(Lq, Lk, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        m = additive(attn_mask)
        mask = m.reshape(B, heads, Lq, Lk) if m.dim() == 3 else m.reshape(1, 1, Lq, Lk)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).reshape(B, 1, 1, Lk)
        mask = pad if mask is None else mask + pad
    return mask


SEQUENCE_LAYERS = {nn.RNN: _TaskRNN, nn.LSTM: _TaskRNN, nn.GRU: _TaskRNN, nn.MultiheadAttention: _TaskMultiheadAttention}
