"""FLOPs per node, from concrete shapes (a probe run) and weight shapes.

Counted: Conv/ConvTranspose, MatMul/Gemm, Einsum, attention ops and recurrent layers — the ops that carry
the cost. Elementwise ops, pooling and normalisation count as zero: they move memory rather than compute,
and counting them would only blur where the work is. A multiply-add is two FLOPs. Loop and Scan count
their body times the trip count (static, else the one the probe saw), If its larger branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir

Shape = tuple[int, ...]
ShapeOf = Callable[[ir.Value | None], Shape | None]


def _prod(xs: Shape) -> int:
    return math.prod(xs) if xs else 1


def node_flops(node: ir.Node, shape_of: ShapeOf) -> int:
    """FLOPs of one node at the batch size ``shape_of`` reports shapes for (0 if unknown or not counted)."""
    op = node.op_type
    if op in ("Loop", "Scan", "If"):
        return subgraph_flops(node, shape_of)
    ins = [shape_of(v) if v is not None else None for v in node.inputs]
    outs = [shape_of(v) for v in node.outputs]
    out = outs[0] if outs else None
    try:
        if op in ("Conv", "ConvInteger", "FusedConv") and out is not None and len(ins) > 1 and ins[1]:
            # out [N, Cout, *sp]; W [Cout, Cin/g, *k]
            return 2 * _prod(out) * _prod(ins[1][1:])
        if op == "QLinearConv" and out is not None and len(ins) > 3 and ins[3]:
            return 2 * _prod(out) * _prod(ins[3][1:])
        if op == "ConvTranspose" and ins[0] and len(ins) > 1 and ins[1]:
            # in [N, Cin, *sp]; W [Cin, Cout/g, *k]
            return 2 * _prod(ins[0]) * _prod(ins[1][1:])
        if op in ("MatMul", "MatMulInteger", "FusedMatMul") and out is not None and ins[0]:
            return 2 * _prod(out) * ins[0][-1]
        if op == "QLinearMatMul" and out is not None and ins[0]:
            return 2 * _prod(out) * ins[0][-1]
        if op in ("Gemm", "FusedGemm") and out is not None and ins[0]:
            trans_a = node.attributes.get_int("transA", 0)
            k = ins[0][0] if trans_a else ins[0][-1]
            return 2 * _prod(out) * k
        if op == "Einsum" and out is not None:
            eq = node.attributes.get_string("equation", "")
            sizes: dict[str, int] = {}
            lhs = eq.replace(" ", "").split("->")[0].split(",")
            for term, shp in zip(lhs, ins, strict=False):
                if shp is None or "." in term:
                    continue
                for letter, d in zip(term, shp, strict=False):
                    sizes[letter] = d
            return 2 * _prod(tuple(sizes.values()))
        if op in ("Attention", "MultiHeadAttention", "GroupQueryAttention") and ins[0] and out is not None:
            # q/k/v projections (Attention only) + scores + weighted sum, approximately
            b, t = ins[0][0], ins[0][1]
            d = out[-1]
            proj = 2 * b * t * ins[0][-1] * 3 * d if op == "Attention" else 0
            return proj + 4 * b * t * t * d
        if op in ("LSTM", "GRU", "RNN") and ins[0] and len(ins) > 2 and ins[1] and ins[2]:
            # R is [directions, gates*hidden, hidden]: gh already counts the gates (4 LSTM, 3 GRU, 1 RNN).
            seq, batch, inp = ins[0]
            dirs, gh, hidden = ins[2]
            return 2 * seq * batch * dirs * gh * (inp + hidden)
    except (IndexError, TypeError, ValueError):
        return 0
    return 0


def _graph_attrs(node: ir.Node) -> dict[str, ir.Graph]:
    return {name: attr.as_graph() for name, attr in node.attributes.items() if attr.type == ir.AttributeType.GRAPH}


def _const_int(v: ir.Value | None) -> int | None:
    if v is None:
        return None
    tensor = v.const_value
    if tensor is None and (p := v.producer()) is not None and p.op_type == "Constant" and "value" in p.attributes:
        tensor = p.attributes["value"].as_tensor()
    if tensor is None:
        return None
    arr = tensor.numpy()
    return int(arr.reshape(-1)[0]) if arr.size == 1 else None


def trip_count(node: ir.Node, shape_of: ShapeOf) -> int | None:
    """Iterations of a Loop or Scan node: a constant trip count ``M`` where the graph has one, else the
    length of the scan outputs the probe saw (Loop) or of the scan inputs (Scan); None when unknown."""
    if node.op_type == "Loop":
        m = _const_int(node.inputs[0] if node.inputs else None)
        if m is not None:
            return max(m, 0)
        body = _graph_attrs(node).get("body")
        n_carried = len(body.inputs) - 2 if body is not None else 0
        for out in node.outputs[n_carried:]:  # scan outputs: one slice per iteration, stacked on axis 0
            s = shape_of(out)
            if s:
                return s[0]
        return None
    if node.op_type == "Scan":
        n_scan = node.attributes.get_int("num_scan_inputs", 0)
        axes = list(node.attributes.get_ints("scan_input_axes", [0] * n_scan))
        scan_inputs = node.inputs[len(node.inputs) - n_scan:] if n_scan else []
        for v, axis in zip(scan_inputs, axes, strict=False):
            s = shape_of(v)
            if s:
                return s[axis % len(s)]
        return None
    return None


def subgraph_flops(node: ir.Node, shape_of: ShapeOf) -> int:
    """FLOPs of a Loop, Scan or If node: its body's nodes (recursively) times the trip count (Loop, Scan),
    the larger branch (If). ``shape_of`` must also know the body's values (see ``inner_shapes`` in
    analysis/prepared.py); a Loop whose trip count is unknown counts one iteration."""
    graphs = _graph_attrs(node)
    if not graphs:
        return 0
    per_graph = {name: sum(node_flops(n, shape_of) for n in g) for name, g in graphs.items()}
    if node.op_type == "If":
        return max(per_graph.values())
    body = per_graph.get("body", 0)
    trips = trip_count(node, shape_of)
    return body * (trips if trips is not None else 1)
