"""Cut a decoder-only LM with a key/value cache into layer segments and a shared draft head.

The source graph has the optimum layout: inputs ``input_ids`` [B, S], ``attention_mask`` [B, P+S],
``position_ids`` [B, S], ``past_key_values.{i}.key|value`` [B, H_kv, P, D]; outputs ``logits`` [B, S, V] and
``present.{i}.key|value`` [B, H_kv, P+S, D].

Segment k runs the layers ``[first, last)`` between two cuts: it reads the model inputs it needs (masks,
rotary tables and shape arithmetic are recomputed from them, as ``extract`` walks past them), the hidden
state at its input cut (``hidden_in``) and the past of its own layers only, and writes the hidden state at its
output cut plus the present of its own layers. The last segment ends at the final norm's input.

The head (final norm + LM head) is cut out once, from the final norm's input to ``logits``, and serves every
exit and the final output (LayerSkip's shared head); its gate is in the graph: ``max_prob`` (max softmax
probability), ``token`` (argmax) and ``gate`` (``max_prob >= threshold``, one bool per position).

Cases:
1. A cut inside a layer (the next segment would need a tensor of an earlier layer, seen as it reading an
   earlier layer's past) is refused, naming the layer.
2. Tied embeddings (the LM head's weight is the embedding's transpose): the head computes
   ``Gemm(x, E, transB=1)`` on the embedding matrix itself, so the bundle stores the matrix once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from eecompile.decoder.acceptance import add_acceptance
from eecompile.errors import GraphError, SpecError
from eecompile.passes.extract_segments import extract_subgraph

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
HIDDEN = "hidden"  # the head's input name
THRESHOLD = "threshold"  # the head's gate threshold input (float32 scalar)


@dataclass
class DecoderGraph:
    """The source model and the facts about its layout."""

    model: ir.Model
    n_layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    hidden_size: int
    inputs: list[str]  # non-cache model inputs


@dataclass
class Segment:
    index: int
    first: int  # first layer (inclusive)
    last: int  # last layer (exclusive)
    graph: ir.Graph
    hidden_in: str | None
    hidden_out: str
    model_inputs: list[str] = field(default_factory=list)


def _static(v: ir.Value, axis: int, what: str) -> int:
    d = v.shape[axis] if v.shape is not None and len(v.shape) > axis else None
    if not isinstance(d, int):
        raise GraphError(f"'{v.name}': axis {axis} ({what}) has no fixed size; export the model with a fixed {what}")
    return d


def inspect_decoder(model: ir.Model, where: str = "model") -> DecoderGraph:
    """Check ``model`` has the KV-cache layout; raise ``GraphError`` naming what is missing."""
    g = model.graph
    ins = {v.name: v for v in g.inputs}
    outs = {v.name: v for v in g.outputs}
    layers = sorted({int(m.group(1)) for n in ins if (m := PAST.match(n or ""))})
    missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in ins]
    if not layers or "logits" not in outs or missing:
        raise GraphError(
            f"{where}: not a decoder with a key/value cache (needs inputs input_ids, attention_mask, position_ids, "
            f"past_key_values.{{i}}.key|value and outputs logits, present.{{i}}.key|value; "
            f"it has inputs {sorted(n for n in ins if n)} and outputs {sorted(n for n in outs if n)}); export it with its cache "
            f"(eecompile.models.lm.export_decoder or optimum's 'text-generation-with-past')")
    if layers != list(range(len(layers))):
        raise GraphError(f"{where}: past_key_values layers {layers} are not numbered 0..{len(layers) - 1}")
    for i in layers:
        for t in ("key", "value"):
            if f"present.{i}.{t}" not in outs:
                raise GraphError(f"{where}: output 'present.{i}.{t}' is missing; export with use_cache=True")
    k0 = ins["past_key_values.0.key"]
    logits = outs["logits"]
    return DecoderGraph(model=model, n_layers=len(layers), kv_heads=_static(k0, 1, "number of KV heads"),
                        head_dim=_static(k0, 3, "head size"), vocab=_static(logits, 2, "vocabulary"),
                        hidden_size=0, inputs=[n for n in ("input_ids", "attention_mask", "position_ids")])


def _past_layers(graph: ir.Graph) -> set[int]:
    return {int(m.group(1)) for v in graph.inputs if (m := PAST.match(v.name or ""))}


def cut_segments(dg: DecoderGraph, cuts: list[str], final_hidden: str) -> list[Segment]:
    """One segment per interval between the cut tensors (layer outputs, in order) and ``final_hidden``.

    Raises ``SpecError`` for a cut that is not at a layer output or out of order (``exits[k].at``).
    """
    g = dg.model.graph
    values = {v.name: v for node in g for v in node.outputs if v.name}
    model_inputs = [v for v in g.inputs if not PAST.match(v.name or "")]
    past = {v.name: v for v in g.inputs if PAST.match(v.name or "")}
    present = {v.name: v for v in g.outputs}
    bounds = check_cuts(values, cuts, final_hidden)
    segments: list[Segment] = []
    first = 0
    hidden_in: ir.Value | None = None
    for k, name in enumerate(bounds):
        where = f"exits[{k}].at" if k < len(cuts) else "final.hidden"
        out = values[name]
        # the layers this segment covers: every layer whose past the cut tensor depends on
        probe = extract_subgraph(g, [*model_inputs, *past.values()] + ([hidden_in] if hidden_in is not None else []),
                         [out], where)
        read = _past_layers(probe)
        if hidden_in is None:
            last = max(read) + 1 if read else 0
        else:
            last = max(read) + 1 if read else first
        if last <= first:
            raise SpecError(f"{where}: '{name}' comes no later than the previous cut (after layer {first}); "
                            f"list the exits in layer order, each after a later layer")
        outs = [out] + [present[f"present.{i}.{t}"] for i in range(first, last) for t in ("key", "value")]
        ins = [*model_inputs] + [past[f"past_key_values.{i}.{t}"] for i in range(first, last)
                                 for t in ("key", "value")]
        if hidden_in is not None:
            ins.append(hidden_in)
        # extract against every past input, so a cut inside a layer shows up as reading an earlier layer's past
        graph = extract_subgraph(g, [*model_inputs, *past.values()] + ([hidden_in] if hidden_in is not None else []),
                         outs, where)
        _own_past_length(graph, first, last)
        check_own_layers(_past_layers(graph), first, last, where, bounds, k, held="cache", layer="decoder layer",
                         reads="the residual sum that the next layer's norm reads")
        if hidden_in is not None:
            _shape_from_hidden(graph, hidden_in.name or "")
        if hidden_in is not None and not any(v.name == hidden_in.name for v in graph.inputs):
            raise SpecError(f"{where}: the layers after '{hidden_in.name}' do not read it; it is not a layer output")
        graph.name = f"segment{k}"
        segments.append(Segment(index=k, first=first, last=last, graph=graph,
                                hidden_in=hidden_in.name if hidden_in is not None else None, hidden_out=name,
                                model_inputs=[v.name or "" for v in graph.inputs
                                              if v.name in {m.name for m in model_inputs}]))
        first = last
        hidden_in = out
    if first != dg.n_layers:
        raise SpecError(f"final.hidden: '{final_hidden}' is the output of layer {first - 1}, not of the last layer "
                        f"({dg.n_layers - 1}); name the final norm's input")
    return segments


def check_own_layers(read: set[int], first: int, last: int, where: str, bounds: list[str], k: int, *, held: str,
                     layer: str, reads: str) -> None:
    """Raise :class:`SpecError` (at ``where``) when segment ``k``, which owns layers ``first..last-1`` between
    ``bounds[k-1]`` (or the model input) and ``bounds[k]``, reads the ``held`` state (cache, recurrent state) of a
    layer in ``read`` it does not own: one of its cuts lies inside a layer."""
    stray = sorted(i for i in read if not first <= i < last)
    if stray:
        name = bounds[k]
        prev = f"'{bounds[k - 1]}'" if k else "the model input"
        raise SpecError(
            f"{where}: layers {first}..{last - 1} between {prev} and '{name}' also need the {held} of layer(s) "
            f"{stray}: the cut {prev if k else repr(name)} is inside a {layer}; cut at a layer's output "
            f"({reads}, 'layers.N.output' in eecompile's export)")


def check_cuts(values: dict[str, ir.Value], cuts: list[str], final_hidden: str) -> list[str]:
    """The segment bounds ``[*cuts, final_hidden]``, each checked to be a tensor of the graph (``values``: name
    -> value); raises ``SpecError`` naming the YAML path (``exits[k].at`` or ``final.hidden``) of one that is not."""
    bounds = [*cuts, final_hidden]
    for k, name in enumerate(bounds):
        if name not in values:
            where = f"exits[{k}].at" if k < len(cuts) else "final.hidden"
            raise SpecError(f"{where}: the model has no tensor '{name}'; name a layer's output "
                            f"(models exported by eecompile.models.lm and .mamba call it 'layers.N.output')")
    return bounds


def _own_past_length(graph: ir.Graph, first: int, last: int) -> None:
    """Read the past length from this segment's own cache.

    Hugging Face computes the past length (for the causal mask's query offsets) from layer 0's cache
    (``Shape(past_key_values.0.key)``); a later segment has no layer-0 cache, but every layer's cache has the
    same [B, H_kv, P, D] shape, so its own first layer's cache gives the same length. Inputs read other than
    by ``Shape`` are left alone (they mean a cut inside a layer).
    """
    own = next((v for v in graph.inputs if v.name == f"past_key_values.{first}.key"), None)
    if own is None:
        return
    for v in list(graph.inputs):
        m = PAST.match(v.name or "")
        if m is None or first <= int(m.group(1)) < last:
            continue
        shapes = _shape_uses(v)
        if shapes is None:
            continue
        for n, idx in shapes:
            n.replace_input_with(idx, own)
        for n in reversed(_pass_through(v)):
            graph.remove(n, safe=True)
        graph.inputs.remove(v)


def _shape_from_hidden(graph: ir.Graph, hidden: str) -> None:
    """Read the embeddings' shape from the segment's input hidden state.

    Hugging Face builds the causal mask from ``inputs_embeds`` (its shape and dtype only), so a later segment
    would keep the embedding ``Gather`` (and the [V, D] matrix in memory) just to take its ``Shape``; the
    hidden state at the cut has the same [B, S, D] shape and dtype.
    """
    h = next((v for v in graph.inputs if v.name == hidden), None)
    if h is None:
        return
    for node in list(graph):
        if node.op_type != "Gather" or node.inputs[1] is None or node.inputs[1].name != "input_ids":
            continue
        shapes = _shape_uses(node.outputs[0])
        if not shapes:
            continue
        for n, idx in shapes:
            n.replace_input_with(idx, h)
        for n in reversed(_pass_through(node.outputs[0])):
            graph.remove(n, safe=True)
        weight = node.inputs[0]
        graph.remove(node, safe=True)  # after the Shape nodes moved: nothing reads it now
        if weight is not None and not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name or "")


def _uses(v: ir.Value) -> list[tuple[ir.Node, int]]:
    return [(u.node, u.idx) if hasattr(u, "node") else (u[0], u[1]) for u in v.uses()]


def _pass_through(v: ir.Value) -> list[ir.Node]:
    """The single-input Concat/Identity nodes ``v`` flows through (the exporter's cache copies)."""
    out = []
    for n, _ in _uses(v):
        if n.op_type in ("Concat", "Identity") and len(n.inputs) == 1:
            out.append(n)
            out += _pass_through(n.outputs[0])
    return out


def _shape_uses(v: ir.Value) -> list[tuple[ir.Node, int]] | None:
    """The ``Shape`` nodes reading ``v`` (through single-input Concat/Identity), or None if anything else reads it."""
    found = []
    for n, idx in _uses(v):
        if n.op_type == "Shape":
            found.append((n, idx))
        elif n.op_type in ("Concat", "Identity") and len(n.inputs) == 1:
            more = _shape_uses(n.outputs[0])
            if more is None:
                return None
            found += more
        else:
            return None
    return found


def _const(name: str, array: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                 const_value=ir.tensor(array, name=name))
    return v


def cut_head(dg: DecoderGraph, final_hidden: str, embedding: ir.Value | None) -> ir.Graph:
    """The shared head: ``hidden`` [B, S, D] float32, ``threshold`` [] float32 and the acceptance inputs of
    ``eecompile.decoder.acceptance`` -> ``logits`` [B, S, V], ``token`` [B, S] int64, ``max_prob`` [B, S] float32,
    ``gate`` [B, S] bool, ``accepted`` [B] int64 (drafts kept) and ``next_token`` [B] int64 (the token after
    them, -1 when none): a verification's outcome, greedy or by speculative rejection sampling.

    ``embedding`` (the embedding matrix [V, D]) replaces a LM head weight equal to its transpose.
    """
    g = dg.model.graph
    values = {v.name: v for node in g for v in node.outputs if v.name}
    logits = next(v for v in g.outputs if v.name == "logits")
    head = extract_subgraph(g, [values[final_hidden]], [logits], "final.hidden")
    extra = [v.name for v in head.inputs if v.name != final_hidden]
    if extra:
        raise SpecError(f"final.hidden: the head after '{final_hidden}' also reads {extra}; name the final norm's input")
    hidden = head.inputs[0]
    hidden.name = HIDDEN
    if embedding is not None and embedding.const_value is not None:
        _tie(head, embedding)
    tape = ir.tape.Tape()
    thr = ir.Value(name=THRESHOLD, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    out = head.outputs[0]
    probs = tape.op("Softmax", [out], attributes={"axis": -1})
    axes = tape.initializer(ir.tensor(np.array([-1], dtype=np.int64), name="head.axes"))
    max_prob = tape.op("ReduceMax", [probs, axes], attributes={"keepdims": 0})
    token = tape.op("ArgMax", [out], attributes={"axis": -1, "keepdims": 0})
    gate = tape.op("GreaterOrEqual", [max_prob, thr])
    for v, n in ((max_prob, "max_prob"), (token, "token"), (gate, "gate")):
        v.name = n
    for node in tape.nodes:
        head.append(node)
    for init in tape.initializers:
        head.register_initializer(init)
    head.inputs.append(thr)
    max_prob.dtype, max_prob.shape = ir.DataType.FLOAT, ir.Shape(["batch", "seq"])
    token.dtype, token.shape = ir.DataType.INT64, ir.Shape(["batch", "seq"])
    gate.dtype, gate.shape = ir.DataType.BOOL, ir.Shape(["batch", "seq"])
    accepted, next_token = add_acceptance(head, out, token, dg.vocab)  # a verification's outcome, in the graph
    head.outputs.extend([token, max_prob, gate, accepted, next_token])
    head.name = "head"
    return head


def _tie(head: ir.Graph, embedding: ir.Value) -> None:
    """Replace ``MatMul(x, W)`` with ``W == E.T`` by ``Gemm(reshape(x, [-1, D]), E, transB=1)`` reshaped back."""
    e = embedding.const_value.numpy()  # type: ignore[union-attr]
    for node in list(head):
        if node.op_type != "MatMul" or node.inputs[1] is None or node.inputs[1].const_value is None:
            continue
        w = node.inputs[1].const_value.numpy()
        if w.shape != e.T.shape or not np.array_equal(w, e.T):
            continue
        x = node.inputs[0]
        tape = ir.tape.Tape()
        ev = ir.Value(name=embedding.name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(e.shape)),
                      const_value=embedding.const_value)
        head.register_initializer(ev)
        flat_shape = tape.initializer(ir.tensor(np.array([-1, e.shape[1]], dtype=np.int64), name="head.flat"))
        vocab = tape.initializer(ir.tensor(np.array([e.shape[0]], dtype=np.int64), name="head.vocab"))
        s = tape.op("Shape", [x], attributes={"start": 0, "end": -1})
        flat = tape.op("Reshape", [x, flat_shape])
        y = tape.op("Gemm", [flat, ev], attributes={"transB": 1})
        shape = tape.op("Concat", [s, vocab], attributes={"axis": 0})
        out = tape.op("Reshape", [y, shape])
        head.insert_before(node, tape.nodes)
        for init in tape.initializers:
            head.register_initializer(init)
        old = node.outputs[0]
        name = old.name
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        old.name = None
        out.name, out.shape = name, old.shape
        if old.dtype is not None:
            out.dtype = old.dtype
        weight = node.inputs[1]
        head.remove(node, safe=True)
        if weight is not None and not weight.uses() and weight.name in head.initializers:
            head.initializers.pop(weight.name or "")
        return


def embedding_of(dg: DecoderGraph) -> ir.Value | None:
    """The embedding matrix: the weight of the Gather that reads ``input_ids``."""
    ids = next(v for v in dg.model.graph.inputs if v.name == "input_ids")
    for use in ids.uses():
        node = use.node if hasattr(use, "node") else use[0]
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            return node.inputs[0]
    return None
