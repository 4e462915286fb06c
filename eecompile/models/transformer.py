"""A small early-exit transformer encoder for sequence classification, with named exit taps.

Inputs ``input_ids`` [B, T] (int64) and ``attention_mask`` [B, T] (1 = token, 0 = padding). ``forward``
returns ``(logits, *taps)`` where tap ``layer{i}`` is the hidden state [B, T, D] after encoder layer i
(every layer but the last). The classifier reads the first token, so a trained ``linear`` head with
``pool: first`` (the default) mirrors it; ``pool: masked_mean`` with ``at: [layer1, attention_mask]`` also works.

The attention is written out (no ``nn.MultiheadAttention`` fast path) so that the ONNX export is plain
MatMul/Softmax that every backend runs; the padding mask adds a large negative number (not -inf, which
would make fully padded rows NaN).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + MLP block."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h) + bias, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.ff(self.ln2(x))


class EarlyExitTransformer(nn.Module):
    """Token + position embeddings, ``n_layers`` encoder layers, layer norm, linear classifier on token 0."""

    def __init__(self, vocab_size: int = 1000, num_classes: int = 2, d_model: int = 64, n_layers: int = 4,
                 n_heads: int = 4, d_ff: int = 128, max_len: int = 128) -> None:
        super().__init__()
        if n_layers < 2:
            raise ValueError("an early-exit encoder needs at least two layers")
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList([EncoderLayer(d_model, n_heads, d_ff) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, num_classes)
        self.exit_taps = tuple(f"layer{i + 1}" for i in range(n_layers - 1))
        self.output_names = ("logits",)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0)
        x = self.tok(input_ids) + self.pos(pos)
        # [B, 1, 1, T]: 0 where a token may be attended to, -1e4 at padding
        bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * -1e4
        taps = []
        for i, layer in enumerate(self.layers):
            x = layer(x, bias)
            if i < len(self.layers) - 1:
                taps.append(x)
        logits = self.fc(self.ln(x)[:, 0])
        return (logits, *taps)
