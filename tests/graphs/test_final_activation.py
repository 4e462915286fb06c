"""Exit outputs mean what the final output means: a model that ends in Softmax/LogSoftmax/Sigmoid gets that
activation applied to each exit head's logits (the gate still reads the logits), so one result array never
mixes probabilities from the final exit with logits from the early ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto as T
from onnx import helper as h

import eecompile
from eecompile.errors import SpecError
from eecompile.passes.attach_heads import FinalActivation, apply_activation

from .builders import pooled_head, small_cnn, with_head_output
from .check import check_bundle


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


ACTS = {"Softmax": _softmax, "LogSoftmax": lambda x: np.log(_softmax(x)), "Sigmoid": lambda x: 1 / (1 + np.exp(-x))}


def _spec(tmp: Path, model: Path, head, final: str = "probs") -> Path:
    p = tmp / "spec.yaml"
    drop = {} if isinstance(head, dict) and "output" in head else {"drop": ["aux"]}  # in-model head unused
    p.write_text(yaml.safe_dump({"model": str(model), "final": {"output": final, **drop},
                                 "exits": [{"at": "pool", "head": head, "gate": {"kind": "max_prob",
                                                                                  "threshold": 0.5}}]}))
    return p


def _feeds(n: int = 10, nhwc: bool = False) -> dict[str, np.ndarray]:
    shape = (n, 32, 32, 3) if nhwc else (n, 3, 32, 32)
    return {"image": np.random.default_rng(3).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("act,opset", [("Softmax", 13), ("LogSoftmax", 11), ("Sigmoid", 9)])
def test_head_file_gets_the_final_activation(act: str, opset: int, tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "m.onnx", activation=act, opset=opset, nhwc=act == "Softmax")
    head = pooled_head(tmp_path / "h.onnx", 6, 10, opset=opset, scale=2.0)
    b = eecompile.compile_model(_spec(tmp_path, model, str(head)), tmp_path / "b.eebundle")
    assert any(f"ends in a {act}" in n for n in b.manifest.notes)
    ref_model = with_head_output(model, head, "pool", "head_logits", tmp_path / "ref.onnx")
    feeds = _feeds(nhwc=act == "Softmax")
    ref = check_bundle(ref_model, b.path, feeds, "probs", ["head_logits"], transform=ACTS[act])
    # The gate reads the logits: its score is the max softmax of the head's logits.
    runner = eecompile.load(b.path)
    r = runner.run(feeds, thresholds="never", policy="never")
    np.testing.assert_allclose(r.gate_scores[0], _softmax(ref["head_logits"]).max(-1), rtol=1e-5)
    forced = runner.run(feeds, thresholds="always").outputs["probs"]
    if act == "Softmax":
        np.testing.assert_allclose(forced.sum(-1), 1.0, rtol=1e-5)  # rows sum to one like the final ones
        # the max_prob gate takes the max of the exit's own Softmax: one Softmax in the segment, not two
        seg0 = onnx.load(str(b.path / b.manifest.segments[0].file))
        assert [n.op_type for n in seg0.graph.node].count("Softmax") == 1


def test_in_model_head_logits_get_the_final_softmax(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "m.onnx", activation="Softmax")
    b = eecompile.compile_model(_spec(tmp_path, model, {"output": "aux"}), tmp_path / "b.eebundle")
    check_bundle(model, b.path, _feeds(), "probs", ["aux"], transform=_softmax)


def test_in_model_head_already_softmaxed_is_taken_as_it_is(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "m.onnx", activation="Softmax", aux_activation="Softmax")
    b = eecompile.compile_model(_spec(tmp_path, model, {"output": "aux"}), tmp_path / "b.eebundle")
    ref = check_bundle(model, b.path, _feeds(), "probs", ["aux"])
    # The gate reads probabilities: its max_prob is their max (it was the max of a softmax of them).
    r = eecompile.load(b.path).run(_feeds(), thresholds="never", policy="never")
    np.testing.assert_allclose(r.gate_scores[0], ref["aux"].max(-1), rtol=1e-5)


def test_in_model_head_with_another_activation_is_refused(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "m.onnx", activation="Softmax", aux_activation="Sigmoid")
    with pytest.raises(SpecError, match="output of a Sigmoid.*the final output 'probs' of a Softmax"):
        eecompile.compile_model(_spec(tmp_path, model, {"output": "aux"}), tmp_path / "b.eebundle")


def test_model_without_final_activation_is_unchanged(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "m.onnx", activation=None)
    b = eecompile.compile_model(_spec(tmp_path, model, {"output": "aux"}), tmp_path / "b.eebundle")
    assert not any("ends in a" in n for n in b.manifest.notes)
    check_bundle(model, b.path, _feeds(), "probs", ["aux"])


@pytest.mark.parametrize("seg_opset", [9, 13, 17])
def test_old_opset_softmax_over_flattened_axes_is_kept(seg_opset: int) -> None:
    """Before opset 13 Softmax(axis=1) of [N, 3, 4] normalises over all 12 values; the exit does the same
    whatever opset its segment has."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 3, 4]))
    g = ir.Graph([x], [], nodes=[], opset_imports={"": seg_opset}, name="act")
    out = apply_activation(g, 0, x, FinalActivation("Softmax", 1, flattened=True), ["batch", 3, 4], "y")
    g.outputs.append(out)
    sess = ort.InferenceSession(ir.to_proto(ir.Model(g, ir_version=8)).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    ref_g = h.make_graph([h.make_node("Softmax", ["x"], ["y"], axis=1)], "ref",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 3, 4])])
    ref = ort.InferenceSession(h.make_model(ref_g, opset_imports=[h.make_opsetid("", 9)], ir_version=4)
                               .SerializeToString(), providers=["CPUExecutionProvider"])
    v = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": v})[0], ref.run(None, {"x": v})[0], rtol=1e-6)
    np.testing.assert_allclose(sess.run(None, {"x": v})[0].reshape(2, -1).sum(-1), 1.0, rtol=1e-6)


def test_replaced_head_keeps_the_final_activation(tmp_path: Path) -> None:
    """train-heads' path: a new head spliced into a bundle whose model ends in a Softmax still has its rows
    softmaxed, and the gate still reads its logits."""

    from eecompile.replace_heads import replace_heads

    model = small_cnn(tmp_path / "m.onnx", activation="Softmax")
    b = eecompile.compile_model(_spec(tmp_path, model, {"kind": "linear"}), tmp_path / "b.eebundle")
    head = pooled_head(tmp_path / "h.onnx", 6, 10, opset=13, scale=2.0, seed=5)
    replace_heads(b.path, {0: onnx.load(str(head))})
    ref_model = with_head_output(model, head, "pool", "head_logits", tmp_path / "ref.onnx")
    feeds = _feeds()
    ref = check_bundle(ref_model, b.path, feeds, "probs", ["head_logits"], transform=_softmax)
    r = eecompile.load(b.path).run(feeds, thresholds="never", policy="never")
    np.testing.assert_allclose(r.gate_scores[0], _softmax(ref["head_logits"]).max(-1), rtol=1e-5)
