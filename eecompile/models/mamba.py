"""A small Mamba-style recurrent decoder in PyTorch and its ONNX export with per-layer state inputs and outputs.

Each block is a Mamba block (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", the ``mamba_simple.Mamba`` mixer, pre-norm residual): RMSNorm, ``in_proj`` to (x, z), a causal
depthwise convolution of width K over x, a selective scan over x with input-dependent ``dt``, B and C, the gate
``y * silu(z)``, ``out_proj`` and the residual sum. The decay is Mamba-2's (Dao & Gu 2024, "Transformers are
SSMs"): one rate per channel, A = -exp(A_log) [D_inner] (Mamba-2's scalar A per head, with heads of one channel),
rather than Mamba-1's [D_inner, S]; that keeps the scan's closed form below O(T^2 D_inner) instead of
O(T^2 D_inner S). The model: an embedding, N blocks, a final RMSNorm and the LM head tied to the embedding.

Per layer i the recurrent state is two tensors (Hugging Face's ``MambaCache`` has the same two):
``past_state.{i}.ssm`` [B, D_inner, S] (the scan state) and ``past_state.{i}.conv`` [B, D_inner, K-1] (the last
K-1 convolution inputs); the outputs ``present_state.{i}.ssm|conv`` are the states after the new positions.

ONNX layout: inputs ``input_ids`` [B, T] int64, ``attention_mask`` [B, T] int64 (1 for a real position, 0 for
right padding: a padded position leaves both states unchanged, so rows with different numbers of new positions
share one call) and the states; outputs ``logits`` [B, T, V] and the present states. T >= 1 is dynamic: one
graph serves prefill, one-token decoding and multi-token verification. Each block's output is named
``layers.{i}.output`` (kept in value_info) so a decoder spec can cut there.

The scan is exported in its closed (parallel) form rather than as an ONNX ``Loop``: with L_t = sum_{j<=t} dt_j A
(a CumSum) and u_t = dt_t x_t, s_t = exp(L_t) s_0 + sum_{i<=t} exp(L_t - L_i) u_i B_i, so
y_t = C_t . s_t = exp(L_t) (C_t . s_0) + sum_{i<=t} exp(L_t - L_i) (C_t . B_i) u_i — the T x T causal form
of a diagonal linear recurrence, as Mamba-2's SSD writes it. It exports with standard ops (CumSum, Exp, Where,
MatMul, ReduceSum) and a dynamic T through the TorchScript exporter, needs no subgraph (the cut and extraction
passes see one flat graph, ONNX Runtime optimises it as any other), and every exponent is <= 0 (stable). Its
memory is O(T^2 D_inner) per row, so the runtime feeds long prompts in chunks
(``eecompile.runtimes.recurrent.CHUNK`` positions): the state carries over, the result is the same.
``TinyMamba.forward`` with T = 1, step by step, is the sequential recurrence the closed form must equal.

torch is imported lazily (inside the functions).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

from eecompile.models.lm import layer_output_name, outputs_to_value_info

log = logging.getLogger(__name__)

STATE_PARTS = ("ssm", "conv")


def past_state_name(i: int, part: str) -> str:
    """The input name of layer ``i``'s recurrent state ``part`` ("ssm" or "conv")."""
    return f"past_state.{i}.{part}"


def present_state_name(i: int, part: str) -> str:
    """The output name of layer ``i``'s recurrent state ``part`` after the new positions."""
    return f"present_state.{i}.{part}"


def _modules() -> Any:
    """The torch modules (built on first use, so importing this file does not import torch)."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    class RMSNorm(nn.Module):
        def __init__(self, d: int, eps: float = 1e-5) -> None:
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class MambaBlock(nn.Module):
        """x [B, T, D], ssm [B, Di, S], conv [B, Di, K-1], mask [B, T] float (1 real, 0 padding) ->
        (x + mixer(norm(x)) [B, T, D], ssm', conv')."""

        def __init__(self, d: int, d_inner: int, d_state: int, d_conv: int, dt_rank: int) -> None:
            super().__init__()
            self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
            self.norm = RMSNorm(d)
            self.in_proj = nn.Linear(d, 2 * d_inner, bias=False)
            self.conv_weight = nn.Parameter(torch.randn(d_inner, d_conv) / math.sqrt(d_conv))
            self.conv_bias = nn.Parameter(torch.zeros(d_inner))
            self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
            self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
            # Mamba-2's initialisation: A in [-16, -1], dt in [1e-3, 1e-1] through softplus's inverse
            self.A_log = nn.Parameter(torch.log(torch.empty(d_inner).uniform_(1.0, 16.0)))
            dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            with torch.no_grad():
                self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.D = nn.Parameter(torch.ones(d_inner))
            self.out_proj = nn.Linear(d_inner, d, bias=False)

        def forward(self, x: torch.Tensor, ssm: torch.Tensor, conv: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            xin, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)  # [B, T, Di] each
            # causal depthwise convolution over (the last K-1 inputs, the new ones)
            cat = torch.cat([conv, xin.transpose(1, 2)], dim=2)  # [B, Di, K-1+T]
            xc = F.conv1d(cat, self.conv_weight.unsqueeze(1), self.conv_bias, groups=self.d_inner)  # [B, Di, T]
            # the new convolution state: the last K-1 real inputs, columns n..n+K-2 of cat (n real positions)
            n = mask.sum(1).to(torch.int64)
            idx = n[:, None, None] + torch.arange(self.d_conv - 1, device=x.device)[None, None, :]
            conv_out = torch.gather(cat, 2, idx.expand(-1, self.d_inner, -1))
            xc = F.silu(xc.transpose(1, 2))  # [B, T, Di]
            dt, bm, cm = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = F.softplus(self.dt_proj(dt)) * mask[..., None]  # [B, T, Di]; 0 at padding: the state passes
            a = -torch.exp(self.A_log)  # [Di]: one decay rate per channel
            cum = torch.cumsum(dt * a, dim=1)  # [B, T, Di]: L_t, the log of the decay from the start to t
            u = dt * xc  # [B, T, Di]: the per-step input (times B_t, per state entry)
            t = x.shape[1]
            pos = torch.arange(t, device=x.device)
            causal = (pos[:, None] >= pos[None, :])[None, :, :, None]  # [1, T(t), T(i), 1]
            diff = cum[:, :, None] - cum[:, None, :]  # L_t - L_i: <= 0 where i <= t
            w = torch.exp(torch.where(causal, diff, torch.full_like(diff, -math.inf)))  # [B, T, T, Di]
            g = cm @ bm.transpose(1, 2)  # [B, T(t), T(i)]: C_t . B_i
            # y_t = C_t . s_t + D x_t, with s_t = exp(L_t) s_0 + sum_{i<=t} exp(L_t - L_i) u_i B_i
            y = (torch.exp(cum) * (cm @ ssm.transpose(1, 2)) + (w * g[..., None] * u[:, None]).sum(2)
                 + self.D * xc)
            last = torch.exp(cum[:, -1:] - cum) * u  # [B, T, Di]: each position's weight in the last state
            ssm_out = torch.exp(cum[:, -1])[..., None] * ssm + last.transpose(1, 2) @ bm  # [B, Di, S]
            y = y * F.silu(z)
            return x + self.out_proj(y), ssm_out, conv_out

    class TinyMamba(nn.Module):
        """Embedding, ``layers`` Mamba blocks, final RMSNorm, LM head tied to the embedding.

        ``forward(input_ids [B, T] int64, attention_mask [B, T], *states)`` with ``states`` per layer
        (ssm [B, Di, S], conv [B, Di, K-1]) returns ``(logits [B, T, V], *present states, *layer outputs)``.
        """

        def __init__(self, vocab: int, d: int, layers: int, d_state: int, d_conv: int, expand: int) -> None:
            super().__init__()
            self.d_inner, self.d_state, self.d_conv = expand * d, d_state, d_conv
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList([MambaBlock(d, expand * d, d_state, d_conv, max(1, math.ceil(d / 16)))
                                         for _ in range(layers)])
            self.norm_f = RMSNorm(d)

        def zero_states(self, batch: int) -> list[torch.Tensor]:
            out = []
            for _ in self.blocks:
                out += [torch.zeros(batch, self.d_inner, self.d_state), torch.zeros(batch, self.d_inner, self.d_conv - 1)]
            return out

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *states: torch.Tensor) -> Any:
            x = self.embed(input_ids)
            mask = attention_mask.to(x.dtype)
            present, taps = [], []
            for i, block in enumerate(self.blocks):
                x, ssm, conv = block(x, states[2 * i], states[2 * i + 1], mask)
                present += [ssm, conv]
                taps.append(x)
            logits = self.norm_f(x) @ self.embed.weight.t()
            return (logits, *present, *taps)

    return TinyMamba


def tiny_mamba(seed: int = 0, *, layers: int = 4, hidden: int = 32, vocab: int = 128, d_state: int = 8,
               d_conv: int = 4, expand: int = 2, embed_std: float = 0.7, block_scale: float = 4.0) -> Any:
    """A random-weight Mamba-style decoder (``TinyMamba``, eval mode, float32) for tests and examples.

    ``embed_std`` (the embedding's std) and ``block_scale`` (``out_proj`` weights times it, ``in_proj`` times
    its square root) make the blocks change the residual stream enough that, through the tied head, the
    next-token distributions are peaked and varied and an early layer agrees with the last one only part of
    the time (~40% after layer 1 of 4 with the defaults), as in a trained model; torch's default initialisation
    gives a model that predicts its input token.
    """
    import torch

    torch.manual_seed(seed)
    model = _modules()(vocab, hidden, layers, d_state, d_conv, expand)
    with torch.no_grad():
        model.embed.weight.normal_(0.0, embed_std)
        for block in model.blocks:
            block.out_proj.weight.mul_(block_scale)
            block.in_proj.weight.mul_(block_scale ** 0.5)
    return model.eval()


def export_mamba(model: Any, path: str | Path, *, opset: int = 18, with_mask: bool = True) -> Path:
    """Export a ``TinyMamba`` to ``path`` with per-layer state inputs/outputs (layout: module docstring).

    ``with_mask=False`` exports without ``attention_mask`` (every position real; rows of one call must then
    have the same number of new positions, which the runtime arranges). Raises ``GraphError`` when the
    exporter fails.
    """
    import torch

    from eecompile.errors import GraphError

    path = Path(path)
    n_layers = len(model.blocks)
    b, t = 2, 3
    ids = torch.randint(0, model.embed.num_embeddings, (b, t))
    mask = torch.ones(b, t, dtype=torch.int64)
    states = model.zero_states(b)
    st_in = [past_state_name(i, p) for i in range(n_layers) for p in STATE_PARTS]
    st_out = [present_state_name(i, p) for i in range(n_layers) for p in STATE_PARTS]
    taps = [layer_output_name(i) for i in range(n_layers)]
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch"} for n in st_in + st_out})
    axes.update({n: {0: "batch", 1: "seq"} for n in taps})
    names = ["input_ids"]
    if with_mask:
        axes["attention_mask"] = {0: "batch", 1: "seq"}
        names.append("attention_mask")
    module = model
    if not with_mask:
        class _NoMask(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, *st: Any) -> Any:
                return self.model(input_ids, torch.ones_like(input_ids), *st)

        module = _NoMask()
    args = (ids, mask, *states) if with_mask else (ids, *states)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=[*names, *st_in],
                              output_names=["logits", *st_out, *taps], dynamic_axes=axes, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
    except Exception as e:  # the exporter raises many types
        raise GraphError(f"export_mamba: torch.onnx.export failed ({e})") from e
    outputs_to_value_info(path, taps)
    log.info("exported %s (%d Mamba blocks, recurrent state)", path, n_layers)
    return path
