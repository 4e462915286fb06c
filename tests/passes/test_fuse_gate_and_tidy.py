"""FuseGatePass and the tidy passes, Before/Expected: a segment whose head is attached, the inputs, outputs and
op list after the passes, and the gate's numbers from ONNX Runtime against numpy."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass

from eecompile.compiler import Pipeline
from eecompile.passes.attach_heads import AttachHeadPass
from eecompile.passes.gates import FuseGatePass
from eecompile.passes.tidy import DropUnreadInputsPass, SegmentOutputsPass, tidy_passes
from eecompile.spec import GateKind

# Segment 1 of a chain: reads the carried h and the model input `unused` (which it no longer needs).
SEGMENT = """
<ir_version: 8, opset_import: ["" : 17]>
seg (float[N, 3] h, float[N, 2] unused) => (float[N, 3] logits, float[N, 3] carried) {
    logits = Neg(h)
    carried = Relu(h)
    dead = Abs(h)
}
"""


def _finish(kind: GateKind, **gate_kw) -> tuple[ir.Model, FuseGatePass]:
    model = ir.from_onnx_text(SEGMENT)
    head = AttachHeadPass(1, ["h"], "y", ["batch", 3], where="exits[1].head", head_output="logits",
                          head_output_shape=["batch", 3])
    gate = FuseGatePass(1, kind, head, ["batch", 3], -1, 17, hidden="h", hidden_shape=["batch", 3], **gate_kw)
    Pipeline(SegmentOutputsPass(["carried"]), head, gate, *tidy_passes())(model)
    return model, gate


def _sess(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def test_max_prob_gate_adds_threshold_input_and_gate_outputs() -> None:
    model, gate = _finish(GateKind.MAX_PROB)
    g = model.graph
    # Expected: `unused` dropped, the threshold added; outputs in the manifest's order.
    assert [v.name for v in g.inputs] == ["h", "ee1.threshold"]
    assert [v.name for v in g.outputs] == ["carried", "ee1.out.y", "ee1.gate", "ee1.score"]
    assert "Abs" not in [n.op_type for n in g]  # nothing read it
    assert all(n.name.startswith("ee1.gate/") for n in g if n.op_type in ("Softmax", "ReduceMax", "GreaterOrEqual"))
    h = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32) * 3
    carried, y, fired, score = _sess(model).run(None, {"h": h, "ee1.threshold": np.array(0.7, np.float32)})
    p = np.exp(-h) / np.exp(-h).sum(1, keepdims=True)
    np.testing.assert_allclose(score, p.max(1), rtol=1e-5)
    np.testing.assert_array_equal(fired, p.max(1) >= 0.7)
    np.testing.assert_allclose(carried, np.maximum(h, 0))
    assert gate.result is not None and gate.result.gate.name == "ee1.gate"


def test_patience_gate_reads_the_previous_state_and_hands_its_own_on() -> None:
    model, _ = _finish(GateKind.PATIENCE, prev_k=0, emit_patience_state=True)
    g = model.graph
    assert [v.name for v in g.inputs] == ["h", "ee0.state.argmax", "ee0.state.count", "ee1.threshold"]
    assert [v.name for v in g.outputs][-2:] == ["ee1.state.argmax", "ee1.state.count"]
    h = np.array([[3, 0, 0], [0, 0, 3]], np.float32)  # argmax of -h: 1 and 0
    feeds = {"h": h, "ee0.state.argmax": np.array([[1], [2]], np.int64),
             "ee0.state.count": np.array([2, 5], np.float32), "ee1.threshold": np.array(3, np.float32)}
    out = dict(zip([o.name for o in _sess(model).get_outputs()], _sess(model).run(None, feeds), strict=True))
    np.testing.assert_array_equal(out["ee1.state.count"], [3, 1])  # agrees with exit 0 once more; disagrees
    np.testing.assert_array_equal(out["ee1.gate"], [True, False])


def test_unread_threshold_and_state_inputs_are_kept() -> None:
    f = ir.TensorType(ir.DataType.FLOAT)
    x, thr, state, own = (ir.Value(name=n, type=f, shape=ir.Shape(["N"]))
                          for n in ("x", "ee3.threshold", "ee2.state.count", "layer.threshold"))
    relu = ir.node("Relu", [x], name="relu")
    model = ir.Model(ir.Graph([x, thr, state, own], relu.outputs, nodes=[relu], opset_imports={"": 17}), ir_version=8)
    RemoveUnusedNodesPass()(model)
    assert DropUnreadInputsPass()(model).modified
    # A runtime feeds thresholds and state to every gated segment; a model's own unread input goes.
    assert [v.name for v in model.graph.inputs] == ["x", "ee3.threshold", "ee2.state.count"]
