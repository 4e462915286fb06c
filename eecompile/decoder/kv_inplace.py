"""Rewrite a decoder segment so its key/value cache is a preallocated buffer written in place.

The exported graph appends each layer's new keys/values with ``Concat(past, new) -> present`` [B, H_kv, P+S, D],
so every call writes a whole new cache. After this rewrite:

- ``present.{i}.key|value = TensorScatter(past_key_values.{i}.key|value, new, write_index)`` (ONNX opset 24,
  ``mode="linear"``, axis -2): ``past`` is the row's whole buffer [B, H_kv, L, D] (L fixed, larger than any
  row's length) and the S new positions of row b go to slots ``write_index[b] ..  write_index[b] + S - 1``.
  Bound through ONNX Runtime's IO binding to the same buffer as past and present, the update is in place
  (ONNX Runtime 1.32's CPU kernel skips its copy when the two alias; it logs a warning when they do not).
- ``write_index = position_ids[:, 0]``: a row's positions are its cache slots (no left padding).
- The attention's additive mask becomes ``0 where slot <= position_ids[b, q] else finfo(float32).min``
  [B, 1, S, L] for every layer: a query sees its own row's slots up to its own position, so slots past a row's
  length (never written, or drafts it rejected) are never read and a rejected draft is undone by lowering the
  row's length alone. ``attention_mask`` is no longer read.

- Each layer's attention core, ``softmax(q K'^T * c + mask) V'`` with ``K'``/``V'`` the cache with its key/value
  heads repeated for grouped-query attention (Hugging Face's ``repeat_kv``: an ``Expand`` copy of the whole
  cache per layer per call), becomes one ONNX ``Attention`` (opset 23+) on the cache buffers themselves, with
  ``scale = c``; it handles grouped heads without the copy. Where that pattern is not found, the exported
  attention stays and reads the buffers through the new mask. ``rewrite_segment`` returns False (the graph unchanged) when the graph does not have this
shape: a ``present`` that is not a two-input ``Concat`` of the past on axis 2, or a layer whose Softmax is not
fed by ``Add(scores, mask)``. The result is checked against the source model by ``decoder.verify``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)

OPSET = 24  # TensorScatter
UPDATE = "tensor_scatter"  # the manifest's decoder.kv.update for segments rewritten here
MASKED = float(np.finfo(np.float32).min)


def _ancestors(v: ir.Value, limit: int = 100000) -> set[int]:
    """ids of the values whose data ``v`` is computed from (``v`` included); a ``Shape`` reads no data."""
    seen: set[int] = set()
    todo = [v]
    while todo and len(seen) < limit:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        p = x.producer()
        if p is not None and p.op_type not in ("Shape", "Size"):
            todo += [i for i in p.inputs if i is not None]
    return seen


def _nearest(v: ir.Value | None, stops: list[ir.Value]) -> list[ir.Value]:
    """The values of ``stops`` that ``v``'s data comes from without passing through another of them."""
    ids = {id(x) for x in stops}
    found: dict[int, ir.Value] = {}
    seen: set[int] = set()
    todo = [v] if v is not None else []
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if id(x) in ids:
            found[id(x)] = x
            continue
        p = x.producer()
        if p is not None and p.op_type not in ("Shape", "Size"):
            todo += [i for i in p.inputs if i is not None]
    return list(found.values())


def _through_copies(v: ir.Value | None) -> ir.Value | None:
    """``v`` before the single-input Concat/Identity nodes the exporter puts on a cache."""
    while v is not None:
        p = v.producer()
        if p is None or p.op_type not in ("Concat", "Identity") or len(p.inputs) != 1:
            return v
        v = p.inputs[0]
    return v


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                 const_value=ir.tensor(array, name=name))
    graph.initializers.add(v)
    return v


@dataclass
class _Core:
    """One layer's attention as exported: softmax(q k^T * scale + mask) v, with k/v the layer's presents."""

    query: ir.Value  # [B, N, S, D], after rotary
    key: ir.Value  # present.{i}.key as exported (replaced by the TensorScatter output)
    value: ir.Value
    scale: float
    out: ir.Value  # [B, N, S, D], the value product's output


def _scalar(v: ir.Value | None) -> float | None:
    if v is None:
        return None
    t = v.const_value
    p = v.producer()
    if t is None and p is not None and p.op_type == "Constant" and "value" in p.attributes:
        t = p.attributes["value"].value
    if t is None:
        return None
    a = np.asarray(t.numpy())
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _attention_core(softmax: ir.Node, add: ir.Node, mask_index: int, presents: list[ir.Value]) -> _Core | None:
    """Match ``MatMul(Softmax(Add(Mul|Div(MatMul(q, K'), c), mask)) [-> Cast...], V')`` where K' and V' are
    computed from one layer's present key and value (Hugging Face's repeat_kv for grouped heads); None if not."""
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    scores = add.inputs[1 - mask_index]
    sp = scores.producer() if scores is not None else None
    if sp is None or sp.op_type not in ("Mul", "Div"):
        return None
    consts = [_scalar(x) for x in sp.inputs]
    j = 1 if consts[1] is not None else 0
    c = consts[j]
    mm = sp.inputs[1 - j].producer() if sp.inputs[1 - j] is not None else None  # type: ignore[union-attr]
    if c is None or mm is None or mm.op_type != "MatMul" or (sp.op_type == "Div" and j == 0):
        return None
    scale = c if sp.op_type == "Mul" else 1.0 / c
    probs = softmax.outputs[0]
    while True:
        users = list(probs.uses())
        if len(users) != 1:
            return None
        user = users[0].node if hasattr(users[0], "node") else users[0][0]
        if user.op_type == "Cast":
            probs = user.outputs[0]
            continue
        break
    if user.op_type != "MatMul" or user.inputs[0] is not probs:
        return None
    ks = _nearest(mm.inputs[1], presents)
    vs = _nearest(user.inputs[1], presents)
    if len(ks) != 1 or len(vs) != 1 or not (ks[0].name or "").endswith(".key") or \
            not (vs[0].name or "").endswith(".value") or mm.inputs[0] is None:
        return None
    if mm.inputs[0].shape is not None and len(mm.inputs[0].shape) != 4:
        return None
    return _Core(query=mm.inputs[0], key=ks[0], value=vs[0], scale=scale, out=user.outputs[0])


def rewrite_segment(graph: ir.Graph, first: int, last: int) -> bool:
    """Rewrite layers ``first..last-1`` of a segment graph in place (see the module docstring); True when done
    (the graph's default opset is then at least :data:`OPSET`)."""
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    pos = inputs.get("position_ids")
    own = inputs.get(f"past_key_values.{first}.key")
    if pos is None or own is None:
        log.info("segment layers %d..%d: no position_ids or own past input; cache stays Concat", first, last - 1)
        return False
    concats: list[tuple[ir.Node, ir.Value, ir.Value]] = []
    for i in range(first, last):
        for t in ("key", "value"):
            out, past = outputs.get(f"present.{i}.{t}"), inputs.get(f"past_key_values.{i}.{t}")
            node = out.producer() if out is not None else None
            if (out is None or past is None or node is None or node.op_type != "Concat" or len(node.inputs) != 2
                    or _through_copies(node.inputs[0]) is not past or node.attributes.get_int("axis", 0) not in (2, -2)):
                log.info("present.%d.%s is not Concat(past, new, axis=2); cache stays Concat", i, t)
                return False
            concats.append((node, past, out))
    presents = [out for _, _, out in concats]
    keys = {id(o) for o in presents}
    adds: list[tuple[ir.Node, int]] = []
    cores: list[_Core] = []
    fused = True
    for node in graph:
        if node.op_type != "Softmax":
            continue
        add = node.inputs[0].producer() if node.inputs[0] is not None else None
        if add is None or add.op_type != "Add":
            log.info("%s is not fed by Add(scores, mask); cache stays Concat", node.name)
            return False
        free = [j for j, x in enumerate(add.inputs) if x is not None and not (_ancestors(x) & keys)]
        if len(free) == 1 and add.inputs[free[0]].dtype not in (None, ir.DataType.FLOAT):  # type: ignore[union-attr]
            log.info("%s: the mask is not float32; cache stays Concat", add.name)
            return False
        if len(free) != 1:
            log.info("%s: cannot tell the mask from the scores; cache stays Concat", add.name)
            return False
        adds.append((add, free[0]))
        attn = _attention_core(node, add, free[0], presents)
        if attn is None:
            fused = False
        else:
            cores.append(attn)
    if len(adds) != last - first:
        log.info("layers %d..%d: %d Softmax nodes for %d layers; cache stays Concat", first, last - 1, len(adds),
                 last - first)
        return False

    p = "kv_inplace/"
    new_nodes: list[ir.Node] = []

    def add_node(op: str, ins: list[ir.Value], name: str, **attrs: Any) -> ir.Value:
        n = ir.node(op, ins, attributes=attrs or None, name=p + name, num_outputs=1)
        n.outputs[0].name = p + name + "_out"
        new_nodes.append(n)
        return n.outputs[0]

    zero_i = _const(graph, p + "zero_i64", np.array(0, np.int64))
    one_i = _const(graph, p + "one_i64", np.array(1, np.int64))
    axes13 = _const(graph, p + "axes_1_3", np.array([1, 3], np.int64))
    axes0 = _const(graph, p + "axes_0", np.array([0], np.int64))
    zero_f = _const(graph, p + "zero_f32", np.array(0.0, np.float32))
    masked = _const(graph, p + "masked_f32", np.array(MASKED, np.float32))
    write_index = add_node("Gather", [pos, zero_i], "write_index", axis=1)  # [B]
    length = add_node("Shape", [own], "cache_length", start=2, end=3)  # [1]: L, the buffer's slots
    slots = add_node("Range", [zero_i, add_node("Squeeze", [length, axes0], "cache_length_scalar"), one_i], "slots")  # [L]
    q_pos = add_node("Unsqueeze", [pos, axes13], "query_position")  # [B, 1, S, 1]
    seen = add_node("LessOrEqual", [slots, q_pos], "visible")  # [B, 1, S, L]
    mask = add_node("Where", [seen, zero_f, masked], "mask")
    first_user = next(iter(graph))
    graph.insert_before(first_user, new_nodes)

    replaced: dict[int, ir.Value] = {}
    for concat, past, out in concats:
        replaced[id(out)] = concat.outputs[0]
        scatter = ir.node("TensorScatter", [past, concat.inputs[1], write_index], attributes={"axis": -2,
                          "mode": "linear"}, name=p + (out.name or "present"), num_outputs=1)
        graph.insert_before(concat, scatter)
        new = scatter.outputs[0]
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        name = out.name
        graph.remove(concat, safe=True)
        new.name = name
        new.type, new.shape = past.type, past.shape
        replaced[id(out)] = new
    if fused:
        for c in cores:
            att = ir.node("Attention", [c.query, replaced[id(c.key)], replaced[id(c.value)], mask],
                          attributes={"scale": c.scale}, name=p + "attention/" + (c.out.name or ""), num_outputs=1)
            graph.insert_before(c.out.producer(), att)  # type: ignore[arg-type]
            c.out.replace_all_uses_with(att.outputs[0])
    else:
        log.info("layers %d..%d: attention kept as exported (repeated key/value heads over the whole cache)",
                 first, last - 1)
        for add, j in adds:
            add.replace_input_with(j, mask)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    # The graph now holds opset-24 ops: declare that first, or the pass looks TensorScatter and Attention up at
    # the export's opset, finds no schema and logs a stack trace per node.
    graph.opset_imports[""] = max(OPSET, graph.opset_imports.get("", 0))
    RemoveUnusedNodesPass()(ir.Model(graph, ir_version=10))
    for v in list(graph.inputs):
        if v.name == "attention_mask" and not v.uses():
            graph.inputs.remove(v)
    return True
