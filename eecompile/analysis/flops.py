"""FLOPs per node, from concrete shapes (a probe run) and weight shapes.

Counted: Conv/ConvTranspose, MatMul/Gemm, Einsum, attention ops and recurrent layers — the ops that carry
the cost. Elementwise ops, pooling and normalisation count as zero: they move memory rather than compute,
and counting them would only blur where the work is. A multiply-add is two FLOPs.
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
