"""Train a decoder bundle's draft heads by self-distillation (no labels): an adapter + a sub-vocabulary head.

An exit's draft head is ``adapter -> final norm -> LM head restricted to a frequent-token sub-vocabulary ->
max-prob gate`` (``draft{k}.onnx``). Two adapter kinds (``adapter=``):

- ``mlp`` (default): a residual MLP, ``h + W2 silu(W1 rmsnorm(h))`` (W2 starts at zero, so training starts from
  the plain shared head), inside ``draft{k}.onnx``, with the model's final norm.
- ``attention``: Kangaroo's adapter, one attention layer and two norms (``eecompile.decoder.adapter``); the
  attention reads its own key/value cache of the row's earlier positions, so it is a separate cache-owning graph
  ``adapter{k}.onnx`` that the runner drives like a segment, and ``draft{k}.onnx`` holds its second norm and the
  head. It trains on whole chunks (causal attention over each), 10% of the chunks held out.

The sub-vocabulary (SpecEE's idea) is the N tokens the
model itself predicts most often on the training text: the full LM head is ~21% of SmolLM2-135M's per-token
compute, N = 4096 of 49 152 rows costs ~2% (the draft then can only propose those tokens; the verifier still
emits any token).

Training data, all offline: text chunks (by default the pydoc topics that ship with Python, plus the model's
own greedy continuations of a few prompts) run through the bundle's own segments; the target is the model's
final-layer distribution renormalised over the sub-vocabulary, the loss KL(target || draft) at temperature 1.
Collecting keeps per position only the exit's and the final layer's hidden states and the final top-1 token
(``collect``); once the sub-vocabulary is chosen from those tokens, the shared head runs again over the final
hidden states, one chunk at a time, for the targets (``sub_targets``). Memory grows with positions x (2D + N),
not with the full vocabulary V: the head's cost is paid twice per position instead of V floats held for each.

torch is imported lazily (training only); the runtime reads ``draft{k}.onnx`` with onnxruntime alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import update_bundle
from eecompile.errors import DataError, SpecError

log = logging.getLogger(__name__)

ADAPTERS = ("mlp", "attention")
# default epochs per adapter: on SmolLM2 the MLP's held-out agreement rose from 35% (8 epochs) to 41% (24) for
# ~30 s more on 2 cores (benchmarks/README.md); the attention adapter costs ~3x the MLP's time per epoch
EPOCHS = {"mlp": 24, "attention": 8}
PROMPTS = [
    "The history of the city begins", "Here is a Python function that", "In mathematics, a prime number is",
    "The recipe calls for", "Dear team, I am writing to", "The main causes of the war were",
    "To install the package, run", "Photosynthesis is the process by which",
]


@dataclass
class DraftTrainReport:
    exits: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def print(self) -> None:
        print(f"trained {len(self.exits)} draft head(s) on {self.tokens} positions in {self.seconds:.0f} s")
        for e in self.exits:
            print(f"  exit after layer {e['after_layer']}: top-1 agreement with the final layer "
                  f"{e['agreement_before']:.1%} -> {e['agreement']:.1%} (held out), sub-vocabulary {e['vocab']} "
                  f"tokens covering {e['coverage']:.1%} of the final layer's choices (held out)")


def default_corpus(max_chars: int = 60_000) -> list[str]:
    """English text that ships with Python: the pydoc topics (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    out, n = [], 0
    for key in sorted(topics):
        text = topics[key].strip()
        out.append(text)
        n += len(text)
        if n >= max_chars:
            break
    return out


def _chunks(runner: Any, texts: list[str], chunk: int, max_tokens: int) -> list[list[int]]:
    tok = runner.tokenizer()
    ids: list[int] = []
    for t in texts:
        ids += list(tok.encode(t).ids)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    return [ids[i:i + chunk] for i in range(0, len(ids) - 1, chunk) if len(ids[i:i + chunk]) > 1]


@dataclass
class Collected:
    """What distillation keeps per training position, all of width D or less (never the vocabulary's V), one
    array per chunk: the exit's hidden states ``exit_states`` [T_i, D], the hidden states the shared head reads
    ``final_states`` [T_i, D] (to compute the sub-vocabulary targets once the sub-vocabulary is chosen,
    ``sub_targets``) and the final layer's top-1 token ``top`` [T_i] int64."""

    exit_states: list[np.ndarray]
    final_states: list[np.ndarray]
    top: list[np.ndarray]


def collect(runner: Any, chunks: list[list[int]], exit_index: int) -> Collected:
    """Run each chunk through the bundle's segments and keep, per position, the exit's hidden state, the final
    layer's hidden state and the final head's top-1 token (``Collected``): 4 x 2D + 8 bytes a position, where
    the full-vocabulary logits would be 4 x V (7.9 GB at 40 000 positions for SmolLM2's 49 152 tokens)."""
    seg = runner.exits[exit_index]["segment"]
    got = Collected([], [], [])
    for ids in chunks:
        row = runner._new_row(0, ids)
        runner._stack([row], 0, seg)
        got.exit_states.append(np.stack(row.pending[seg + 1]))
        out = runner._stack([row], seg + 1, len(runner.segments) - 1)[0]
        got.final_states.append(out)
        got.top.append(runner._run_head(out[None], 2.0, False)["token"][0])
    return got


def sub_vocabulary(top: np.ndarray, size: int, vocab: int) -> np.ndarray:
    """The ``size`` tokens (of ``vocab``) the final layer chose most often in ``top``, ties to the lower id,
    sorted: the draft head's sub-vocabulary ``ids`` [N] int64."""
    counts = np.bincount(top, minlength=vocab)
    return np.sort(np.argsort(-counts, kind="stable")[:min(size, vocab)]).astype(np.int64)


def sub_targets(runner: Any, final_states: list[np.ndarray], ids: np.ndarray) -> Iterator[Any]:
    """Per chunk of ``final_states`` [T_i, D]: the distillation target, the final head's distribution
    renormalised over the sub-vocabulary ``ids``, softmax(logits[:, ids]) [T_i, N] (a torch tensor), from the
    shared head run again over the stored final hidden states; only one chunk's full logits exist at a time."""
    import torch

    for f in final_states:
        z = runner._run_head(f[None], 2.0, True)["logits"][0]
        yield torch.softmax(torch.from_numpy(z[:, ids]), -1)


def train_draft_heads(bundle_path: str | Path, *, texts: list[str] | None = None, vocab: int = 4096,
                      hidden: int = 1024, epochs: int | None = None, lr: float = 2e-3, max_tokens: int = 6000,
                      chunk: int = 128, generate_tokens: int = 32, seed: int = 0, threads: int | None = None,
                      exits: list[int] | None = None, adapter: str = "mlp") -> DraftTrainReport:
    """Train a draft head (adapter + ``vocab``-token head) for each exit and write ``draft{k}.onnx`` (and, for the
    attention adapter, ``adapter{k}.onnx``) into the bundle, atomically.

    ``texts``: training text (default: ``default_corpus()``); ``generate_tokens``: also distil on the model's own
    greedy continuation of ``PROMPTS`` (0: none). ``max_tokens``: positions used (10% held out to report the
    agreement). ``epochs``: passes over the training positions (default ``EPOCHS[adapter]``: 24 for the MLP, 8
    for the attention adapter). ``adapter``: ``mlp`` or ``attention`` (module docstring); ``hidden`` is the MLP's
    width. Raises
    ``SpecError`` for a bundle without exits or an unknown adapter kind, ``DataError`` when the text is too short.
    """
    import torch

    from eecompile.runtimes.lm import DecoderRunner

    if adapter not in ADAPTERS:
        raise SpecError(f"adapter: '{adapter}' is not one of {list(ADAPTERS)}")
    t0 = time.perf_counter()
    runner = DecoderRunner(bundle_path, threads=threads)
    if not runner.exits:
        raise SpecError(f"{bundle_path}: the decoder bundle has no exits to train")
    if adapter == "attention" and runner.dec.get("state"):
        raise SpecError(f"{bundle_path}: the attention adapter keeps a key/value cache, which a recurrent-state "
                        f"decoder's runner does not; use the MLP adapter (--adapter mlp)")
    epochs = EPOCHS[adapter] if epochs is None else epochs
    texts = list(texts) if texts is not None else default_corpus()
    chunks = _chunks(runner, texts, chunk, max_tokens)
    if generate_tokens > 0:
        gen = runner.generate(PROMPTS, generate_tokens, mode="none")
        tok = runner.tokenizer()
        chunks += [list(tok.encode(p).ids) + r["token_ids"] for p, r in zip(PROMPTS, gen.results, strict=True)]
    n_pos = sum(len(c) for c in chunks)
    if n_pos < 200:
        raise DataError(f"training text: {n_pos} tokens; give at least 200 tokens of text")
    torch.manual_seed(seed)
    report = DraftTrainReport(tokens=n_pos)
    drafts: dict[int, tuple[Any, dict[str, Any], Any]] = {}
    for k in (exits if exits is not None else range(len(runner.exits))):
        train = _train_attention_exit if adapter == "attention" else _train_exit
        proto, info, module = train(runner, chunks, k, vocab=vocab, hidden=hidden, epochs=epochs, lr=lr)
        drafts[k] = (proto, info, module)
        report.exits.append({"after_layer": runner.exits[k]["after_layer"], **info})

    def change(tmp: Path, manifest: Any) -> None:
        import onnx

        from eecompile.decoder.adapter import check_adapter, export_adapter

        for k, (proto, info, module) in drafts.items():
            onnx.save(proto, str(tmp / info["file"]))
            old = tmp / f"adapter{k}.onnx"
            if old.exists():  # an attention adapter an earlier train-heads wrote
                old.unlink()
            if module is not None:
                layer = int(runner.dec["layers"]) + k  # a layer index no segment uses: the adapter's cache names
                update = export_adapter(module, old, layer, in_place=runner.in_place)
                info["adapter_check"] = check_adapter(old, module, layer, in_place=runner.in_place)
                info["adapter_segment"] = {"file": old.name, "layers": [layer, layer + 1], "hidden_in": "hidden",
                                           "hidden_out": "hidden_out", "kv_update": update}
            manifest.decoder["exits"][k]["draft_head"] = info
        manifest.notes = [n for n in manifest.notes if "draft heads untrained" not in n]

    update_bundle(bundle_path, change)
    report.seconds = time.perf_counter() - t0
    return report


def _train_exit(runner: Any, chunks: list[list[int]], k: int, *, vocab: int, hidden: int, epochs: int,
                lr: float) -> tuple[Any, dict[str, Any], None]:
    """Distil exit ``k``'s draft head with the MLP adapter; return its ONNX model and its manifest entry."""
    import torch

    got = collect(runner, chunks, k)
    h, final_top = np.concatenate(got.exit_states), np.concatenate(got.top)
    n_val = max(len(h) // 10, 1)
    perm = torch.randperm(len(h))
    val, tr = perm[:n_val], perm[n_val:]
    # the sub-vocabulary: the final layer's most frequent choices on the training positions (not the held-out)
    ids = sub_vocabulary(final_top[tr.numpy()], vocab, runner.vocab)
    coverage = float(np.isin(final_top[val.numpy()], ids).mean())
    target, at = torch.empty(len(h), len(ids)), 0  # filled chunk by chunk: one [T, N] array at a time
    for t in sub_targets(runner, got.final_states, ids):
        target[at:at + len(t)], at = t, at + len(t)
    del got
    emb, norm_w, eps = _head_weights(runner)
    norm_w = np.array(norm_w)  # writable: torch.from_numpy shares it
    adapter = _Adapter(h.shape[1], hidden)
    head_w = torch.from_numpy(emb[ids])  # [N, D]
    norm = torch.from_numpy(norm_w)
    x = torch.from_numpy(h)
    top_full = torch.from_numpy(final_top)
    pos = np.searchsorted(ids, final_top).clip(0, len(ids) - 1)
    in_sub = torch.from_numpy(np.where(ids[pos] == final_top, pos, -100))  # -100: outside, ignored

    def agreement(idx: torch.Tensor) -> float:
        with torch.no_grad():
            z = _rms(adapter(x[idx]), norm, eps) @ head_w.T
            return float((torch.from_numpy(ids)[z.argmax(-1)] == top_full[idx]).float().mean())

    before = agreement(val)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * ((len(tr) + 255) // 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    for _ in range(epochs):
        for b in tr[torch.randperm(len(tr))].split(256):
            _distil_step(opt, sched, _rms(adapter(x[b]), norm, eps) @ head_w.T, target[b], in_sub[b])
    after = agreement(val)
    info = {"file": f"draft{k}.onnx", "vocab": int(len(ids)), "adapter": "mlp", "adapter_hidden": hidden,
            "coverage": coverage, "agreement_before": before, "agreement": after, "positions": int(len(x))}
    return _draft_graph(runner, adapter, ids, emb, norm_w, eps), info, None


def _train_attention_exit(runner: Any, chunks: list[list[int]], k: int, *, vocab: int, hidden: int, epochs: int,
                          lr: float) -> tuple[Any, dict[str, Any], Any]:
    """Distil exit ``k``'s draft head with Kangaroo's attention adapter over whole chunks (causal); return the
    head's ONNX model (second norm + sub-vocabulary head), its manifest entry and the trained adapter module."""
    import torch

    from eecompile.decoder.adapter import AttentionAdapter

    del hidden  # the attention adapter's width is the model's
    got = collect(runner, chunks, k)
    hs, tops = got.exit_states, got.top
    n_val = max(len(hs) // 10, 1) if len(hs) > 1 else 0
    order = torch.randperm(len(hs)).tolist()
    val, tr = order[:n_val], order[n_val:] or order
    ids = sub_vocabulary(np.concatenate([tops[i] for i in tr]), vocab, runner.vocab)
    held = np.concatenate([tops[i] for i in val]) if val else np.concatenate(tops)
    coverage = float(np.isin(held, ids).mean())
    emb, norm_w, eps = _head_weights(runner)
    head_w = torch.from_numpy(emb[ids])
    module = AttentionAdapter(runner.hidden_size, runner.kv_heads, runner.head_dim, np.array(norm_w))
    xs = [torch.from_numpy(h)[None] for h in hs]
    targets = list(sub_targets(runner, got.final_states, ids))
    del got
    sub = [torch.from_numpy(np.where(np.isin(t, ids), np.searchsorted(ids, t).clip(0, len(ids) - 1), -100))
           for t in tops]

    def logits_of(i: int) -> torch.Tensor:
        pos = torch.arange(xs[i].shape[1])[None]
        a, _, _ = module(xs[i], pos)
        return module.out_norm(a)[0] @ head_w.T

    def agreement(idx: list[int]) -> float:
        with torch.no_grad():
            hits = [(torch.from_numpy(ids)[logits_of(i).argmax(-1)] == torch.from_numpy(tops[i])).float() for i in idx]
        return float(torch.cat(hits).mean())

    held_idx = val or tr
    with torch.no_grad():  # before training: the exit state through the final norm and the sub-vocabulary head
        before = float(torch.cat([(torch.from_numpy(ids)[(_rms(xs[i][0], torch.from_numpy(np.array(norm_w)), eps)
                                                          @ head_w.T).argmax(-1)] == torch.from_numpy(tops[i])).float()
                                  for i in held_idx]).mean())
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * len(tr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    for _ in range(epochs):
        for i in torch.randperm(len(tr)).tolist():
            _distil_step(opt, sched, logits_of(tr[i]), targets[tr[i]], sub[tr[i]])
    module.eval()
    after = agreement(held_idx)
    info = {"file": f"draft{k}.onnx", "vocab": int(len(ids)), "adapter": "attention",
            "adapter_heads": int(module.q.out_features // runner.head_dim), "coverage": coverage,
            "agreement_before": before, "agreement": after, "positions": int(sum(len(h) for h in hs))}
    norm_out = module.norm_out.detach().numpy().astype(np.float32)
    return _draft_graph(runner, None, ids, emb, norm_out, 1e-5), info, module


def _distil_step(opt: Any, sched: Any, z: Any, target: Any, top: Any) -> None:
    """One optimiser step on draft logits ``z`` [N, V_sub]: KL(target || softmax(z)) plus half a cross-entropy on
    the final layer's own choice ``top`` [N] (index in the sub-vocabulary, -100 outside it), since the verifier
    accepts on top-1."""
    import torch

    loss = torch.nn.functional.kl_div(torch.log_softmax(z, -1), target, reduction="batchmean")
    if bool((top >= 0).any()):
        loss = loss + 0.5 * torch.nn.functional.cross_entropy(z, top)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _rms(x: Any, w: Any, eps: float) -> Any:
    import torch

    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _Adapter(d: int, hidden: int) -> Any:  # noqa: N802 (a torch module factory; torch is imported lazily)
    import torch

    class Adapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.Parameter(torch.ones(d))
            self.up = torch.nn.Linear(d, hidden, bias=False)
            self.down = torch.nn.Linear(hidden, d, bias=False)
            torch.nn.init.zeros_(self.down.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.silu(self.up(_rms(x, self.norm, 1e-5))))

    return Adapter()


def _head_weights(runner: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """The shared head's embedding [V, D], final-norm weight [D] and epsilon, read from ``head.onnx``."""
    import onnx_ir as ir

    head = ir.load(runner.bundle.file(runner.dec["head"]["file"]))
    emb = norm_w = None
    eps = 1e-5
    for node in head.graph:
        if node.op_type == "Gemm":
            emb = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
        if node.op_type == "Add" and node.inputs[1] is not None:
            val = _constant(node.inputs[1])
            if val is not None and val.size == 1 and 0 < float(val) < 1e-3:
                eps = float(val)
    for v in head.graph.initializers.values():
        if v.const_value is not None and list(v.const_value.shape) == [runner.hidden_size]:
            norm_w = v.const_value.numpy()
    if emb is None or norm_w is None:
        raise SpecError(f"{runner.bundle.path}: the head has no tied Gemm + norm weight; draft heads need a tied "
                        f"LM head (tie_word_embeddings)")
    return np.asarray(emb, np.float32), np.asarray(norm_w, np.float32), eps


def _constant(v: Any) -> np.ndarray | None:
    """The value of an initializer or of a ``Constant`` node's output, else None."""
    if v.const_value is not None:
        return np.asarray(v.const_value.numpy())
    prod = v.producer()
    if prod is not None and prod.op_type == "Constant" and "value" in prod.attributes:
        return np.asarray(prod.attributes["value"].value.numpy())
    return None


def _draft_graph(runner: Any, adapter: Any, ids: np.ndarray, emb: np.ndarray, norm_w: np.ndarray,
                 eps: float) -> Any:
    """``draft{k}.onnx``: hidden [B, S, D], threshold [] -> token [B, S] int64 (full-vocabulary ids), max_prob and
    gate [B, S], logits [B, S, N] (over the sub-vocabulary), vocab_ids [N] int64. ``adapter``: the MLP adapter,
    or None (the input is already adapted: the attention adapter's output), then the norm ``norm_w``."""
    from onnx import TensorProto, helper, numpy_helper

    d = runner.hidden_size

    def init(name: str, arr: np.ndarray) -> Any:
        return numpy_helper.from_array(np.ascontiguousarray(arr), name)

    inits = [init("final.norm", norm_w), init("draft.embT", emb[ids].T), init("vocab_ids", ids),
             init("eps_a", np.array(1e-5, np.float32)), init("eps", np.array(eps, np.float32)),
             init("two", np.array(2.0, np.float32)), init("axes", np.array([-1], np.int64))]
    if adapter is not None:
        a = {n: p.detach().numpy().astype(np.float32) for n, p in adapter.named_parameters()}
        inits += [init("adapter.norm", a["norm"]), init("adapter.up", a["up.weight"].T),
                  init("adapter.down", a["down.weight"].T)]
    n = helper.make_node
    nodes = []

    def rms(x: str, w: str, e: str, out: str) -> None:
        nodes.extend([
            n("Pow", [x, "two"], [f"{out}.sq"]), n("ReduceMean", [f"{out}.sq", "axes"], [f"{out}.ms"], keepdims=1),
            n("Add", [f"{out}.ms", e], [f"{out}.mse"]), n("Sqrt", [f"{out}.mse"], [f"{out}.rms"]),
            n("Div", [x, f"{out}.rms"], [f"{out}.n"]), n("Mul", [f"{out}.n", w], [out])])

    if adapter is not None:
        rms("hidden", "adapter.norm", "eps_a", "a.normed")
        nodes += [n("MatMul", ["a.normed", "adapter.up"], ["a.up"]), n("Sigmoid", ["a.up"], ["a.sig"]),
                  n("Mul", ["a.up", "a.sig"], ["a.act"]), n("MatMul", ["a.act", "adapter.down"], ["a.down"]),
                  n("Add", ["hidden", "a.down"], ["adapted"])]
    else:
        nodes.append(n("Identity", ["hidden"], ["adapted"]))
    rms("adapted", "final.norm", "eps", "h.normed")
    nodes += [n("MatMul", ["h.normed", "draft.embT"], ["logits"]),
              n("Softmax", ["logits"], ["probs"], axis=-1),
              n("ReduceMax", ["probs", "axes"], ["max_prob"], keepdims=0),
              n("ArgMax", ["logits"], ["sub_token"], axis=-1, keepdims=0),
              n("Gather", ["vocab_ids", "sub_token"], ["token"]),
              n("GreaterOrEqual", ["max_prob", "threshold"], ["gate"]),
              n("Identity", ["vocab_ids"], ["vocab_ids_out"])]
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        nodes, "draft_head",
        [helper.make_tensor_value_info("hidden", f, ["batch", "seq", d]),
         helper.make_tensor_value_info("threshold", f, [])],
        [helper.make_tensor_value_info("token", i64, ["batch", "seq"]),
         helper.make_tensor_value_info("max_prob", f, ["batch", "seq"]),
         helper.make_tensor_value_info("gate", TensorProto.BOOL, ["batch", "seq"]),
         helper.make_tensor_value_info("logits", f, ["batch", "seq", len(ids)]),
         helper.make_tensor_value_info("vocab_ids_out", i64, [len(ids)])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)

