"""FLOPs per node from concrete shapes (a multiply-add counts 2; elementwise ops count 0), and per sample
from the probe (the difference between two batch sizes)."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from eecompile.analysis.flops import node_flops
from eecompile.compiler import prepare

GRAPH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3, 8, 8] x, float[2, 5, 7] a, float[2, 7, 4] b, float[6, 5] p) => (float[2, 16, 8, 8] c) <float[16, 3, 3, 3] w = {0}> {
    c = Conv<pads = [1, 1, 1, 1]>(x, w)
    mm = MatMul(a, b)
    gt = Gemm<transA = 1>(p, p)
    es = Einsum<equation = "bij,bjk->bik">(a, b)
    r = Relu(c)
}
"""

SHAPES = {"x": (2, 3, 8, 8), "w": (16, 3, 3, 3), "c": (2, 16, 8, 8), "a": (2, 5, 7), "b": (2, 7, 4),
          "mm": (2, 5, 4), "p": (6, 5), "gt": (5, 5), "es": (2, 5, 4), "r": (2, 16, 8, 8)}


@pytest.mark.parametrize("op, expected", [
    ("Conv", 2 * (2 * 16 * 8 * 8) * (3 * 3 * 3)),  # 2 x output elements x (Cin/g x kH x kW)
    ("MatMul", 2 * (2 * 5 * 4) * 7),  # 2 x output elements x K
    ("Gemm", 2 * (5 * 5) * 6),  # transA: K is A's first axis
    ("Einsum", 2 * 2 * 5 * 7 * 4),  # 2 x the product of every index size
    ("Relu", 0),
])
def test_node_flops(op: str, expected: int) -> None:
    model = ir.from_onnx_text(GRAPH)
    node = next(n for n in model.graph if n.op_type == op)
    assert node_flops(node, lambda v: SHAPES.get(v.name) if v is not None else None) == expected


def test_unknown_shapes_count_zero() -> None:
    node = next(n for n in ir.from_onnx_text(GRAPH).graph if n.op_type == "Conv")
    assert node_flops(node, lambda v: None) == 0


def test_flops_per_sample_come_from_two_batch_sizes(tmp_path: Path) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 6] x) => (float[N, 3] y) <float[6, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18},
                                          float[3, 3] v = {1, 0, 0, 0, 1, 0, 0, 0, 1}> {
        t = MatMul(x, w)
        vt = Transpose(v)
        y = MatMul(t, vt)
    }"""
    onnx.save(onnx.parser.parse_model(text), tmp_path / "m.onnx")
    pm = prepare(tmp_path / "m.onnx")
    # Per sample: 2*6*3 for the first MatMul, 2*3*3 for the second; the batch-free Transpose counts 0.
    assert pm.node_flops == [2 * 6 * 3, 0, 2 * 3 * 3] and pm.total_flops == 54
    assert pm.cum_flops == [36, 0, 54]
