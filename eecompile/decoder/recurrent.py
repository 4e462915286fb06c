"""Compile a decoder whose layers carry a recurrent state (Mamba-style) instead of a key/value cache.

The source graph's layout (``eecompile.models.mamba.export_mamba`` writes it): inputs ``input_ids`` [B, T]
int64, optionally ``attention_mask`` [B, T] int64 (1 for a real position, 0 for right padding, which must
leave the state unchanged) and, per layer i, one or more float32 state tensors ``past_state.{i}`` or
``past_state.{i}.{part}`` with fixed non-batch dims; outputs ``logits`` [B, T, V] and, for each state input,
``present_state.{i}[.{part}]`` of the same shape: the state after the T new positions. The layer outputs are
named (``layers.{i}.output`` in eecompile's export) so a spec can cut there; the spec is the KV decoder's
(``kind: decoder``, ``exits[].after_layer``, ``final.hidden``; ``kv_cache`` does not apply).

Segment k runs the layers ``[first, last)`` between two cuts and owns their states: it reads the model inputs it
needs, the hidden state at its input cut and the past states of its own layers, and writes the hidden state at
its output cut and their present states. The head is the KV decoder's (``eecompile.decoder.cut.cut_head``: final
norm + tied LM head + gate + in-graph acceptance, stored once). DYNAMAX (Nogales et al. 2025) puts early exits
in Mamba decoders this way; the runtime is ``eecompile.runtimes.recurrent``.

Cases:
1. A state input without its ``present_state`` output, or the reverse: one ``GraphError`` naming both.
2. A cut inside a layer (a segment would need an earlier layer's state) is refused, naming the layers.
3. A model with both ``past_key_values.*`` and ``past_state.*`` (a hybrid) is refused: not supported.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from eecompile.bundle import Bundle
from eecompile.decoder.compile import DecoderSpec, decoder_section, name_hidden, write_decoder_bundle
from eecompile.decoder.cut import DecoderGraph, Segment, check_cuts, check_own_layers, cut_head, embedding_of
from eecompile.errors import GraphError, SpecError
from eecompile.passes.extract_segments import extract_subgraph

log = logging.getLogger(__name__)

STATE_IN = re.compile(r"^past_state\.(\d+)((?:\.[A-Za-z0-9_]+)?)$")
STATE_OUT = re.compile(r"^present_state\.(\d+)((?:\.[A-Za-z0-9_]+)?)$")
MASK = "attention_mask"
UPDATE = "recurrent"  # decoder.segments[].kv_update of a segment that carries a recurrent state


@dataclass
class RecurrentGraph:
    """The source model and the facts about its state layout."""

    model: ir.Model
    n_layers: int
    parts: dict[str, list[int]]  # state part ("" for a bare past_state.{i}) -> its shape without the batch dim
    vocab: int
    masked: bool  # has an attention_mask [B, T] input (padded positions leave the state unchanged)

    def names(self, prefix: str, first: int, last: int) -> list[str]:
        """``past_state``/``present_state`` names of layers ``first..last-1``, layer-major, parts in order."""
        return [f"{prefix}.{i}{p}" for i in range(first, last) for p in self.parts]


def is_recurrent(model: ir.Model) -> bool:
    """True when the model has ``past_state.*`` inputs (a recurrent-state decoder)."""
    return any(STATE_IN.match(v.name or "") for v in model.graph.inputs)


def inspect_recurrent(model: ir.Model, where: str = "model") -> RecurrentGraph:
    """Check ``model`` has the recurrent-state layout; raise ``GraphError`` naming what is missing."""
    g = model.graph
    ins = {v.name: v for v in g.inputs}
    outs = {v.name: v for v in g.outputs}
    if any((n or "").startswith("past_key_values.") for n in ins):
        raise GraphError(f"{where}: has both past_key_values.* and past_state.* inputs; decoders that mix a "
                         f"key/value cache and a recurrent state are not supported")
    for name in ("input_ids",):
        if name not in ins:
            raise GraphError(f"{where}: input '{name}' [batch, seq] is missing; a recurrent decoder reads token ids")
    if "logits" not in outs:
        raise GraphError(f"{where}: output 'logits' [batch, seq, vocab] is missing")
    states: dict[int, list[str]] = {}
    for n in ins:
        if (m := STATE_IN.match(n or "")) is not None:
            want = f"present_state.{m.group(1)}{m.group(2)}"
            if want not in outs:
                raise GraphError(f"{where}: state input '{n}' has no matching output '{want}'; export the state "
                                 f"after the new positions as '{want}' (same shape as '{n}')")
            states.setdefault(int(m.group(1)), []).append(m.group(2))
    for n in outs:
        if (m := STATE_OUT.match(n or "")) is not None and f"past_state.{m.group(1)}{m.group(2)}" not in ins:
            raise GraphError(f"{where}: state output '{n}' has no matching input 'past_state.{m.group(1)}{m.group(2)}'; "
                             f"a layer's state must come in (the state before the new positions) and go out")
    layers = sorted(states)
    if layers != list(range(len(layers))):
        raise GraphError(f"{where}: past_state layers {layers} are not numbered 0..{len(layers) - 1}")
    parts = states[0]
    parts.sort()
    shapes: dict[str, list[int]] = {}
    for i in layers:
        if sorted(states[i]) != parts:
            raise GraphError(f"{where}: layer {i} has state parts {sorted(states[i])}, layer 0 has {parts}; every "
                             f"layer must carry the same state tensors")
        for p in parts:
            v, o = ins[f"past_state.{i}{p}"], outs[f"present_state.{i}{p}"]
            if v.dtype != ir.DataType.FLOAT:
                raise GraphError(f"{where}: '{v.name}' is {v.dtype}; recurrent states must be float32")
            dims = [d for d in list(v.shape or [])[1:] if isinstance(d, int)]
            if v.shape is None or len(dims) != len(v.shape) - 1:
                raise GraphError(f"{where}: '{v.name}' has shape {v.shape}; export the state with a fixed shape "
                                 f"beyond the batch dim")
            if o.shape is not None and len(o.shape) == len(dims) + 1 and list(o.shape)[1:] != dims:
                raise GraphError(f"{where}: '{o.name}' has shape {o.shape}, '{v.name}' {v.shape}; a present state "
                                 f"must have its past state's shape")
            if i == 0:
                shapes[p] = dims
            elif shapes[p] != dims:
                raise GraphError(f"{where}: '{v.name}' has shape {v.shape}; layer 0's is [batch, {shapes[p]}]")
    logits = outs["logits"]
    vocab = logits.shape[-1] if logits.shape is not None and len(logits.shape) == 3 else None
    if not isinstance(vocab, int):
        raise GraphError(f"{where}: 'logits' has shape {logits.shape}; export with a fixed vocabulary (last dim)")
    return RecurrentGraph(model=model, n_layers=len(layers), parts=shapes, vocab=vocab, masked=MASK in ins)


def _state_layers(graph: ir.Graph) -> set[int]:
    return {int(m.group(1)) for v in graph.inputs if (m := STATE_IN.match(v.name or ""))}


def cut_recurrent_segments(rg: RecurrentGraph, cuts: list[str], final_hidden: str) -> list[Segment]:
    """One segment per interval between the cut tensors (layer outputs, in order) and ``final_hidden``, each
    owning its layers' states. Raises ``SpecError`` for a cut that is not a layer output or out of order."""
    g = rg.model.graph
    values = {v.name: v for node in g for v in node.outputs if v.name}
    model_inputs = [v for v in g.inputs if not STATE_IN.match(v.name or "")]
    past = [v for v in g.inputs if STATE_IN.match(v.name or "")]
    present = {v.name: v for v in g.outputs}
    bounds = check_cuts(values, cuts, final_hidden)
    segments: list[Segment] = []
    first, hidden_in = 0, None
    for k, name in enumerate(bounds):
        where = f"exits[{k}].at" if k < len(cuts) else "final.hidden"
        sources = [*model_inputs, *past] + ([hidden_in] if hidden_in is not None else [])
        read = _state_layers(extract_subgraph(g, sources, [values[name]], where))
        last = max(read) + 1 if read else first
        if last <= first:
            raise SpecError(f"{where}: '{name}' comes no later than the previous cut (after layer {first - 1}); "
                            f"list the exits in layer order, each after a later layer")
        outs = [values[name]] + [present[n] for n in rg.names("present_state", first, last)]
        graph = extract_subgraph(g, sources, outs, where)
        check_own_layers(_state_layers(graph), first, last, where, bounds, k, held="state", layer="layer",
                         reads="the residual sum the next layer reads")
        if hidden_in is not None and not any(v.name == hidden_in.name for v in graph.inputs):
            raise SpecError(f"{where}: the layers after '{hidden_in.name}' do not read it; it is not a layer output")
        graph.name = f"segment{k}"
        names = {m.name for m in model_inputs}
        segments.append(Segment(index=k, first=first, last=last, graph=graph,
                                hidden_in=hidden_in.name if hidden_in is not None else None, hidden_out=name,
                                model_inputs=[v.name or "" for v in graph.inputs if v.name in names]))
        first, hidden_in = last, values[name]
    if first != rg.n_layers:
        raise SpecError(f"final.hidden: '{final_hidden}' is the output of layer {first - 1}, not of the last layer "
                        f"({rg.n_layers - 1}); name the final norm's input")
    return segments


def compile_recurrent(spec: DecoderSpec, model: ir.Model, output: Path, *, verify: bool = True) -> Bundle:
    """``compile_decoder`` for a recurrent-state decoder (``model`` loaded from ``spec.model``).

    Raises ``GraphError`` (layout: module docstring), ``SpecError`` (exits) and ``BundleError`` (the chain does
    not reproduce the model).
    """
    from eecompile.models.lm import layer_output_name

    rg = inspect_recurrent(model, str(spec.model))
    final_hidden = spec.final_hidden or layer_output_name(rg.n_layers - 1)
    for k, ex in enumerate(spec.exits):
        if ex.at == final_hidden:
            raise SpecError(f"exits[{k}]: '{ex.at}' is the last layer's output; an exit must come before it")
    segments = cut_recurrent_segments(rg, [e.at for e in spec.exits], final_hidden)
    dg = DecoderGraph(model=model, n_layers=rg.n_layers, kv_heads=0, head_dim=0, vocab=rg.vocab, hidden_size=0,
                      inputs=[])
    emb = embedding_of(dg)
    head = cut_head(dg, final_hidden, emb)
    d = head.inputs[0].shape[-1] if head.inputs[0].shape is not None else None
    if not isinstance(d, int) and emb is not None and emb.shape is not None:
        d = emb.shape[1]
    if not isinstance(d, int):
        raise GraphError(f"'{final_hidden}': the hidden size is not fixed; export with a static hidden size")
    name_hidden(segments, head, d)
    graphs: dict[str, Any] = {f"segment{s.index}.onnx": s.graph for s in segments}
    graphs["head.onnx"] = head
    decoder = decoder_section(spec, segments, rg.n_layers, rg.vocab, d,
                              state={"parts": {p.lstrip("."): shape for p, shape in rg.parts.items()},
                                     "dtype": "float32", "masked": rg.masked})
    for seg, s in zip(decoder["segments"], segments, strict=True):
        seg["kv_update"] = UPDATE
        seg["state_inputs"] = rg.names("past_state", s.first, s.last)
        seg["state_outputs"] = rg.names("present_state", s.first, s.last)
    del head, segments

    def check(tmp: Path) -> None:
        verify_recurrent(tmp, spec.model)

    return write_decoder_bundle(spec, output, graphs, dict(model.opset_imports), decoder,
                                check if verify else None)


def verify_recurrent(bundle_dir: Path, source: Path, seed: int = 0) -> float:
    """``eecompile.decoder.verify.verify_decoder`` for a recurrent bundle: rows of 5 and 3 prompt tokens in one
    (padded) call, then a decode step on the states the segments wrote, each against the source model run from
    zero states over the row's whole sequence. Returns the largest relative logit difference; raises
    ``BundleError`` above its tolerance."""
    from eecompile.decoder.verify import verify_decoder

    def feeds(runner: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
        out = {"input_ids": ids, **runner.zero_state_feeds(0, runner.dec["layers"])}
        if runner.dec["state"]["masked"]:
            out[MASK] = np.ones_like(ids)
        return out

    worst = verify_decoder(bundle_dir, source, seed, source_feeds=feeds)
    log.info("recurrent decoder verified: largest relative logit difference %.1e", worst)
    return worst
