"""Extraction, Before/Expected: a model in ONNX text cut at one tensor, the op list and boundary of each
segment graph, and the chain's numbers from ONNX Runtime against the unsplit model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from eecompile.analysis.partition import plan_segments
from eecompile.compiler import prepare
from eecompile.passes.extract_segments import extract_segments

# `mm` is computed from the input m alone (recomputable): never carried, recomputed in each segment.
MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, float[N, 4] m) => (float[N, 4] out)
<float[4, 4] w1 = {1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 1, 1},
 float[4, 4] w2 = {0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1}> {
    mm = Sigmoid(m)
    a = MatMul(x, w1)
    h = Mul(a, mm)
    b = MatMul(h, w2)
    out = Mul(b, mm)
}
"""


def _segments(tmp_path: Path):
    path = tmp_path / "model.onnx"
    onnx.save(onnx.parser.parse_model(MODEL), path)
    pm = prepare(path)
    v = pm.index.values
    plans = plan_segments(pm.index, [[v["h"]], [v["out"]]])
    return pm, plans, extract_segments(pm, plans)


def test_cut_at_h_carries_h_and_recomputes_the_mask(tmp_path: Path) -> None:
    pm, plans, (s0, s1) = _segments(tmp_path)
    # Expected: segment 0 = Sigmoid (recomputed), MatMul, Mul; segment 1 = its own Sigmoid, MatMul, Mul.
    assert sorted(n.op_type for n in s0.graph) == ["MatMul", "Mul", "Sigmoid"]
    assert sorted(n.op_type for n in s1.graph) == ["MatMul", "Mul", "Sigmoid"]
    assert s0.carried_out == ["h"] and s1.carried_in == ["h"] and plans[1].depends_on == [0]
    # Case 1: segment 1 does not read x, so x is not among its inputs.
    assert [v.name for v in s0.graph.inputs] == ["x", "m"] and s1.model_inputs == ["m"]
    assert sorted(v.name for v in s1.graph.inputs) == ["h", "m"]
    # Case 2: boundary values are typed, the batch axis symbolic.
    h_in = next(v for v in s1.graph.inputs if v.name == "h")
    assert h_in.dtype == ir.DataType.FLOAT and list(h_in.shape) == ["batch", 4]
    assert pm.batch_mode == "dynamic"


def test_chain_of_extracted_segments_equals_the_model(tmp_path: Path) -> None:
    pm, _, (s0, s1) = _segments(tmp_path)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32), "m": rng.standard_normal((3, 4)).astype(np.float32)}

    def run(g: ir.Graph, f: dict) -> dict:
        g.opset_imports.setdefault("", 17)
        proto = ir.to_proto(ir.Model(g, ir_version=8))
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, {i.name: f[i.name] for i in sess.get_inputs()}), strict=True))

    env = {**feeds, **run(s0.graph, feeds)}
    got = run(s1.graph, env)["out"]
    full = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, full.run(None, feeds)[0], rtol=1e-6)
