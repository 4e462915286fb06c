"""AttachHeadPass, Before/Expected: a segment graph and a head in ONNX text, the op list and outputs after the
pass, and the exit output's numbers from ONNX Runtime against numpy."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from eecompile.analysis.exits import ExitPlan
from eecompile.errors import SpecError
from eecompile.passes.attach_heads import AttachHeadPass, FinalActivation, exit_activation
from eecompile.spec import ExitSpec

SEGMENT = """
<ir_version: 8, opset_import: ["" : 17]>
seg (float[N, 4] x) => (float[N, 2] h) <float[4, 2] w = {1, 0, 0, 1, 1, 1, 0, 2}> {
    m = MatMul(x, w)
    h = Relu(m)
    l = Neg(h)
}
"""

# Head files often have empty or clashing node names ("" twice here; "m" also names a segment tensor).
HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
head (float[N, 2] feat) => (float[N, 3] m) <float[2, 3] hw = {1, 2, 3, 4, 5, 6}, float[3] hb = {0, 1, 0}> {
    t = MatMul(feat, hw)
    m = Add(t, hb)
}
"""

X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
W = np.array([[1, 0], [0, 1], [1, 1], [0, 2]], np.float32)
HW, HB = np.arange(1, 7, dtype=np.float32).reshape(2, 3), np.array([0, 1, 0], np.float32)


def _run(model: ir.Model, outputs: list[str]) -> list[np.ndarray]:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"x": X})


def _attach(final_shape: list, **kw) -> tuple[ir.Model, AttachHeadPass]:
    model = ir.from_onnx_text(SEGMENT)
    p = AttachHeadPass(0, ["h"], "y", final_shape, where="exits[0].head", **kw)
    assert p(model).modified
    return model, p


def test_head_file_is_spliced_under_the_exit_prefix() -> None:
    model, p = _attach(["batch", 3], head=ir.from_onnx_text(HEAD))
    g = model.graph
    # Expected: the segment's nodes, then the head's, renamed under ee0.head/, then the exit output.
    assert [n.op_type for n in g] == ["MatMul", "Relu", "Neg", "MatMul", "Add", "Identity"]
    assert [n.name for n in list(g)[3:]] == ["ee0.head/MatMul_0", "ee0.head/Add_1", "ee0.head/out"]
    assert sorted(g.initializers) == ["ee0.head/hb", "ee0.head/hw", "w"]
    assert [v.name for v in g.outputs] == ["h", "ee0.out.y"] and p.output is p.logits
    (y,) = _run(model, ["ee0.out.y"])
    np.testing.assert_allclose(y, np.maximum(X @ W, 0) @ HW + HB, rtol=1e-5)


def test_in_model_head_is_only_renamed() -> None:
    model, p = _attach(["batch", 2], head_output="l", head_output_shape=["batch", 2])
    assert [n.op_type for n in model.graph][-1] == "Identity" and p.output is not None
    (y,) = _run(model, ["ee0.out.y"])
    np.testing.assert_allclose(y, -np.maximum(X @ W, 0), rtol=1e-6)


def test_exit_output_takes_the_final_outputs_per_sample_shape() -> None:
    model, _ = _attach(["batch", 3, 1, 1], head=ir.from_onnx_text(HEAD))
    assert [n.op_type for n in model.graph][-1] == "Reshape"
    (y,) = _run(model, ["ee0.out.y"])
    assert y.shape == (5, 3, 1, 1)


def test_final_softmax_is_applied_to_the_exit_output_and_the_gate_reads_logits() -> None:
    model, p = _attach(["batch", 3], head=ir.from_onnx_text(HEAD), activation=FinalActivation("Softmax", 1))
    assert p.logits is not None and p.logits.name == "ee0.logits" and p.output is not None
    assert [n.op_type for n in model.graph][-1] == "Softmax"
    model.graph.outputs.append(p.logits)  # the gate pass reads it inside the segment; exposed here to check it
    y, logits = _run(model, ["ee0.out.y", "ee0.logits"])
    z = np.maximum(X @ W, 0) @ HW + HB
    np.testing.assert_allclose(logits, z, rtol=1e-5)
    np.testing.assert_allclose(y, np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-5)


def test_class_count_that_does_not_fit_names_both_shapes() -> None:
    with pytest.raises(SpecError, match=r"exits\[0\]\.head: the head gives per-sample shape \[3\], the final output "
                                        r"has \[10\]"):
        _attach(["batch", 10], head=ir.from_onnx_text(HEAD))


def test_head_reading_another_rank_is_refused() -> None:
    head = ir.from_onnx_text(HEAD.replace("float[N, 2] feat", "float[N, 2, 1] feat"))
    with pytest.raises(SpecError, match="has rank 3 .* the cut tensor 'h' has rank 2"):
        _attach(["batch", 3], head=head)


def test_in_model_head_ending_in_another_activation_is_refused() -> None:
    model = ir.from_onnx_text(SEGMENT.replace("l = Neg(h)", "l = Sigmoid(h)"))
    l_value = next(v for n in model.graph for v in n.outputs if v.name == "l")
    plan = ExitPlan(0, ExitSpec.__new__(ExitSpec), [l_value], head_output=l_value)
    with pytest.raises(SpecError, match="output of a Sigmoid, the final output 'y' of a Softmax"):
        exit_activation(FinalActivation("Softmax", 1), plan, None, "y", "exits[0].head")
    assert exit_activation(FinalActivation("Sigmoid"), plan, None, "y", "exits[0].head") is None


TIME_MAJOR = """
<ir_version: 8, opset_import: ["" : 17]>
seg (float[T, N, 2] x) => (float[T, N, 2] h) {
    h = Relu(x)
}
"""

# A batch-first head: mean over time (axis 1 of [N, T, 2]), then the same MatMul + Add as HEAD.
POOL_HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
head (float[N, T, 2] feat) => (float[N, 3] m) <float[2, 3] hw = {1, 2, 3, 4, 5, 6}, float[3] hb = {0, 1, 0}> {
    p = ReduceMean <axes = [1], keepdims = 0> (feat)
    t = MatMul(p, hw)
    m = Add(t, hb)
}
"""


def test_head_at_a_time_major_tensor_reads_a_batch_first_view() -> None:
    from eecompile.passes.attach_heads import BatchFirstPass, HeadView

    model = ir.from_onnx_text(TIME_MAJOR)
    view = HeadView("h", 1, "ee0.head_in.0", ["batch", "T", 2])
    assert view.perm == [1, 0, 2]
    assert BatchFirstPass([view])(model).modified
    p = AttachHeadPass(0, [view.name], "y", ["batch", 3], where="exits[0].head", head=ir.from_onnx_text(POOL_HEAD))
    assert p(model).modified
    g = model.graph
    # Expected: Relu, the Transpose making the view, the head (reading the view), the exit output.
    assert [n.op_type for n in g] == ["Relu", "Transpose", "ReduceMean", "MatMul", "Add", "Identity"]
    tr = list(g)[1]
    assert tr.name == "ee0.head_in.0/Transpose" and tr.inputs[0].name == "h"
    assert list(tr.attributes["perm"].as_ints()) == [1, 0, 2] and tr.outputs[0].name == "ee0.head_in.0"
    assert list(g)[2].inputs[0] is tr.outputs[0]
    x = np.random.default_rng(1).standard_normal((6, 4, 2)).astype(np.float32)  # T=6, N=4
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(["ee0.out.y"], {"x": x})
    assert y.shape == (4, 3)
    np.testing.assert_allclose(y, np.maximum(x, 0).mean(axis=0) @ HW + HB, rtol=1e-5)


def test_batch_axis_zero_adds_no_view() -> None:
    from eecompile.passes.attach_heads import BatchFirstPass, HeadView

    model = ir.from_onnx_text(SEGMENT)
    assert not BatchFirstPass([HeadView("h", 0, "h", ["batch", 2])])(model).modified
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu", "Neg"]
