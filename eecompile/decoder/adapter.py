"""Kangaroo's draft-head adapter: one attention layer and two norms over an exit's hidden states, with its own KV cache.

Kangaroo (Liu et al. 2024, "Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting") drafts with the
model's first layers plus an adapter of "one multi-head attention and two normalization layers" before the shared
LM head. Here::

    a = h + W_o Attention(RoPE(W_q n), RoPE(W_k n), W_v n),   n = rmsnorm(h) * w_in     (causal, own KV cache)
    draft logits = (rmsnorm(a) * w_out) @ E[sub-vocabulary]^T                            (w_out starts as the final norm)

W_o starts at zero, so training starts from the plain shared head. The attention reads the adapter's keys and
values of every earlier position of the row, computed from the exit's hidden states there, so the adapter is a
cache-owning graph like a segment: ``adapter{k}.onnx`` has the segment interface (``hidden`` [B, S, D],
``attention_mask``, ``position_ids`` [B, S], ``past_key_values.{A}.key|value`` [B, H_kv, P, D_h] ->
``hidden_out`` [B, S, D], ``present.{A}.key|value``), with A = the model's layer count + k (a layer index no
segment uses), and the runner keeps its cache with the segments' (in place: ``kv_inplace.rewrite_segment``
turns its exported ``Concat`` cache into ``TensorScatter`` + ONNX ``Attention``, as for the segments). The second
norm and the sub-vocabulary head are ``draft{k}.onnx`` (``eecompile.decoder.train``).

The adapter's heads: H_kv and D_h are the model's (the runner's cache buffers have that shape), H_q = D / D_h
rounded down to a multiple of H_kv. Its rotary base is 10 000 (its own choice; it is trained from scratch).

torch is imported lazily.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROPE_BASE = 10_000.0
EPS = 1e-5


def attention_heads(hidden: int, kv_heads: int, head_dim: int) -> int:
    """Query heads of the adapter: ``hidden // head_dim`` rounded down to a multiple of ``kv_heads`` (at least that)."""
    return max(kv_heads, (hidden // head_dim) // kv_heads * kv_heads)


def AttentionAdapter(d: int, kv_heads: int, head_dim: int, norm_out: Any) -> Any:  # noqa: N802 (a torch module factory)
    """The adapter as a torch module. ``forward(x [B, S, D], position_ids [B, S], attention_mask [B, P+S] or None,
    past_k/past_v [B, H_kv, P, D_h] or None) -> (adapted [B, S, D], present_k, present_v)``; ``out_norm(a)`` is
    the second norm. ``norm_out``: the model's final-norm weight [D] (the second norm's start)."""
    import torch

    heads = attention_heads(d, kv_heads, head_dim)

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))

    class Adapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm_in = torch.nn.Parameter(torch.ones(d))
            self.norm_out = torch.nn.Parameter(torch.as_tensor(norm_out, dtype=torch.float32).clone())
            self.q = torch.nn.Linear(d, heads * head_dim, bias=False)
            self.k = torch.nn.Linear(d, kv_heads * head_dim, bias=False)
            self.v = torch.nn.Linear(d, kv_heads * head_dim, bias=False)
            self.o = torch.nn.Linear(heads * head_dim, d, bias=False)
            torch.nn.init.zeros_(self.o.weight)
            inv = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            self.register_buffer("inv_freq", inv, persistent=False)

        def out_norm(self, a: torch.Tensor) -> torch.Tensor:
            return rms(a, self.norm_out)

        def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            inv: torch.Tensor = self.inv_freq  # type: ignore[assignment]  # a registered buffer
            ang = pos[:, None, :, None].to(torch.float32) * inv  # [B, 1, S, D_h/2]
            emb = torch.cat([ang, ang], -1)
            half = x.shape[-1] // 2
            rot = torch.cat([-x[..., half:], x[..., :half]], -1)
            return x * emb.cos() + rot * emb.sin()

        def forward(self, x: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None) -> Any:
            b, s, _ = x.shape
            n = rms(x, self.norm_in)
            q = self._rope(self.q(n).view(b, s, heads, head_dim).transpose(1, 2), position_ids)
            k = self._rope(self.k(n).view(b, s, kv_heads, head_dim).transpose(1, 2), position_ids)
            v = self.v(n).view(b, s, kv_heads, head_dim).transpose(1, 2)
            if past_k is not None and past_v is not None:
                k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            total = k.shape[2]
            rep = heads // kv_heads  # Hugging Face's repeat_kv: [B, H_kv, T, D_h] -> [B, H_q, T, D_h]
            kr = k[:, :, None].expand(b, kv_heads, rep, total, head_dim).reshape(b, heads, total, head_dim)
            vr = v[:, :, None].expand(b, kv_heads, rep, total, head_dim).reshape(b, heads, total, head_dim)
            # query i (at slot total - s + i) sees slot j <= its own and unmasked (left padding)
            slots = torch.arange(total, device=x.device)
            qslot = (total - s) + torch.arange(s, device=x.device)
            ok = slots[None, :] <= qslot[:, None]
            if attention_mask is not None:
                ok = ok[None, None] & (attention_mask[:, None, None, :] > 0)
            else:
                ok = ok[None, None].expand(b, 1, s, total)
            mask = torch.where(ok, torch.zeros((), dtype=torch.float32), torch.finfo(torch.float32).min)
            scores = torch.matmul(q, kr.transpose(2, 3)) * (head_dim ** -0.5) + mask
            att = torch.matmul(torch.softmax(scores, dim=-1), vr)
            return x + self.o(att.transpose(1, 2).reshape(b, s, heads * head_dim)), k, v

    return Adapter()


def export_adapter(adapter: Any, path: str | Path, layer: int, *, in_place: bool) -> str:
    """Write the adapter as a cache-owning graph (module docstring) to ``path``; return its cache update,
    ``"tensor_scatter"`` (in place) or ``"concat"``. Raises ``GraphError`` when an in-place rewrite was asked for
    and the exported attention does not have the shape it needs (a bug here)."""
    import onnx
    import onnx_ir as ir
    import torch

    from eecompile.decoder.kv_inplace import OPSET, UPDATE, rewrite_segment
    from eecompile.errors import GraphError

    class _Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = adapter

        def forward(self, hidden: Any, attention_mask: Any, position_ids: Any, past_k: Any, past_v: Any) -> Any:
            return self.a(hidden, position_ids, attention_mask, past_k, past_v)

    d = adapter.norm_in.shape[0]
    head_dim = 2 * adapter.inv_freq.shape[0]
    kv_heads = adapter.k.out_features // head_dim
    b, p, s = 2, 3, 2
    args = (torch.zeros(b, s, d), torch.ones(b, p + s, dtype=torch.int64),
            torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous(),
            torch.zeros(b, kv_heads, p, head_dim), torch.zeros(b, kv_heads, p, head_dim))
    past = [f"past_key_values.{layer}.{t}" for t in ("key", "value")]
    present = [f"present.{layer}.{t}" for t in ("key", "value")]
    axes: dict[str, dict[int, str]] = {"hidden": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                                       "position_ids": {0: "batch", 1: "seq"}, "hidden_out": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in past})
    axes.update({n: {0: "batch", 2: "total"} for n in present})
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Flat().eval(), args, str(path), input_names=["hidden", "attention_mask", "position_ids", *past],
                          output_names=["hidden_out", *present], dynamic_axes=axes, opset_version=18, dynamo=False,
                          do_constant_folding=True)
    if not in_place:
        return "concat"
    model = ir.load(path)
    if not rewrite_segment(model.graph, layer, layer + 1):
        raise GraphError(f"{path.name}: the adapter's attention could not be rewritten for the in-place cache; "
                         f"this is a bug in eecompile, please report it")
    model.graph.opset_imports[""] = max(OPSET, model.graph.opset_imports.get("", 0))
    model.opset_imports[""] = model.graph.opset_imports[""]
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return UPDATE


TOLERANCE = 1e-3  # max |difference| of the exported adapter's output from the torch module's, relative to its scale


def check_adapter(path: str | Path, adapter: Any, layer: int, *, in_place: bool, seed: int = 0) -> float:
    """Run the exported adapter (``path``) as the runner does, a prefill of 5 positions then 2 more on its cache,
    against the torch module over all 7 at once; return the largest relative difference. Raises ``GraphError``
    above ``TOLERANCE`` (a bug in the export, not bad input)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from eecompile.errors import GraphError

    d = adapter.norm_in.shape[0]
    head_dim = 2 * adapter.inv_freq.shape[0]
    kv_heads = adapter.k.out_features // head_dim
    x = np.random.default_rng(seed).normal(size=(1, 7, d)).astype(np.float32)
    with torch.no_grad():
        want = adapter(torch.from_numpy(x), torch.arange(7)[None])[0].numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # without IO binding TensorScatter copies (and says so): expected here
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [f"past_key_values.{layer}.{t}" for t in ("key", "value")]
    past = [np.zeros((1, kv_heads, 16 if in_place else 0, head_dim), np.float32)] * 2
    got = []
    for lo, hi in ((0, 5), (5, 7)):
        feeds = {"hidden": x[:, lo:hi], "position_ids": np.arange(lo, hi, dtype=np.int64)[None],
                 **dict(zip(names, past, strict=True))}
        if not in_place:
            feeds["attention_mask"] = np.ones((1, hi), np.int64)
        out = sess.run(None, feeds)
        got.append(out[0])
        past = out[1:]
    diff = float(np.abs(np.concatenate(got, 1) - want).max()) / max(float(np.abs(want).max()), 1.0)
    if diff > TOLERANCE:
        raise GraphError(f"{Path(path).name}: the exported adapter differs from the trained one by {diff:.2e} "
                         f"(> {TOLERANCE}); this is a bug in eecompile, please report it")
    return diff
