"""Compiler behaviour on small graphs from ONNX text: in-model heads with a score output, per-sample mode for
graphs that cannot be made batch-dynamic, subgraph cuts, and spec errors that name the tensor and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_head, write_spec

import eecompile
from eecompile.errors import BundleError, SpecError

SCORED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y, float[N, 3] aux, float[N, 1] conf)
  <float[4, 4] w1 = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}, float[4, 3] wa = {1,0,0, 0,1,0, 0,0,1, 1,1,1},
   float[4, 1] wc = {1, -1, 0.5, 0}, float[4, 3] wy = {2,0,0, 0,2,0, 0,0,2, 0,0,0}> {
    h = MatMul(x, w1)
    r = Relu(h)
    aux = MatMul(r, wa)
    c = MatMul(r, wc)
    conf = Sigmoid(c)
    h2 = MatMul(r, w1)
    r2 = Tanh(h2)
    y = MatMul(r2, wy)
}
"""


def _save(tmp: Path, text: str, name: str = "m.onnx") -> Path:
    path = tmp / name
    onnx.save(onnx.parser.parse_model(text), path)
    return path


def test_score_gate_reads_a_head_output(tmp_path: Path) -> None:
    model = _save(tmp_path, SCORED)
    spec = write_spec(tmp_path, model, [{"at": "r", "head": {"output": "aux", "score_output": "conf"},
                                         "gate": {"kind": "score", "threshold": 0.5}}], {"output": "y"})
    bundle = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert bundle.manifest.outputs[0].name == "y"
    runner = eecompile.load(bundle.path)
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    res = runner.run({"x": x})
    r = np.maximum(x, 0)
    conf = 1 / (1 + np.exp(-(r @ np.array([1, -1, 0.5, 0], np.float32))))
    np.testing.assert_array_equal(res.exit_index == 0, conf >= 0.5)
    aux = r @ np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], np.float32)
    np.testing.assert_allclose(res.outputs["y"][conf >= 0.5], aux[conf >= 0.5], rtol=1e-5)
    never = runner.run({"x": x}, policy="never")
    np.testing.assert_allclose(never.gate_scores[0], conf, rtol=1e-5)


def test_built_in_head_scored_by_a_model_tensor(tmp_path: Path) -> None:
    """A built-in head (``kind: linear``) whose ``score_output`` names a model tensor: the head's own graph
    has one output, the score gate reads the model's ``conf``."""
    model = _save(tmp_path, SCORED)
    spec = write_spec(tmp_path, model, [{"at": "r", "head": {"kind": "linear", "score_output": "conf"},
                                         "gate": {"kind": "score", "threshold": 0.5}}],
                      {"output": "y", "drop": ["aux"]})
    runner = eecompile.load(eecompile.compile_model(spec, tmp_path / "b.eebundle").path)
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    r = np.maximum(x, 0)
    conf = 1 / (1 + np.exp(-(r @ np.array([1, -1, 0.5, 0], np.float32))))
    never = runner.run({"x": x}, policy="never")
    np.testing.assert_allclose(never.gate_scores[0], conf, rtol=1e-5)
    res = runner.run({"x": x})
    np.testing.assert_array_equal(res.exit_index == 0, conf >= 0.5)
    assert 0 < (conf >= 0.5).sum() < 64
    y = np.tanh(r) @ np.array([[2, 0, 0], [0, 2, 0], [0, 0, 2], [0, 0, 0]], np.float32)
    np.testing.assert_allclose(res.outputs["y"][conf < 0.5], y[conf < 0.5], rtol=1e-5, atol=1e-6)


MIXING = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 4] x) => (float[1, 3] y) <float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1},
                                       float[4, 3] wy = {1,0,0, 0,1,0, 0,0,1, 1,1,1}, int64[1] ax = {0}> {
    h = MatMul(x, w)
    r = Relu(h)
    m = ReduceMean<keepdims = 1>(r, ax)
    s = Sub(r, m)
    h2 = MatMul(s, w)
    y = MatMul(h2, wy)
}
"""


def test_graph_that_cannot_be_batched_runs_per_sample(tmp_path: Path) -> None:
    model = _save(tmp_path, MIXING)
    head = make_head(tmp_path / "h.onnx", [1, 4], 3)
    spec = write_spec(tmp_path, model, [{"at": "r", "head": str(head), "gate": {"kind": "max_prob", "threshold": 0.5}}])
    bundle = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert bundle.manifest.batch_mode == "per_sample"
    assert any("one sample at a time" in n for n in bundle.manifest.notes)
    runner = eecompile.load(bundle.path)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    res = runner.run({"x": x}, thresholds="never")
    ws = np.eye(4, dtype=np.float32)
    wy = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], np.float32)
    r = np.maximum(x, 0)
    ref = ((r - r) @ ws) @ wy  # ReduceMean over a batch of one sample is the sample itself
    np.testing.assert_allclose(res.outputs["y"], ref, atol=1e-6)
    from eecompile.inspect import describe_bundle

    assert "sample" in str(describe_bundle(bundle.path)).lower()


LOOPED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, bool cond) => (float[N, 4] y) <float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> {
    h = MatMul(x, w)
    r = Relu(h)
    z = If(cond) <
        then_branch = t () => (float[N, 4] y1) { inner = MatMul(r, w)
                                                 y1 = Relu(inner) },
        else_branch = e () => (float[N, 4] y2) { y2 = Identity(r) }
    >
    y = MatMul(z, w)
}
"""


def test_spec_errors_name_the_tensor_and_write_nothing(tmp_path: Path) -> None:
    model = _save(tmp_path, LOOPED)
    head = make_head(tmp_path / "h.onnx", [1, 4], 4)
    out = tmp_path / "b.eebundle"

    def compile_with(exits: list[dict]) -> str:
        spec = write_spec(tmp_path, model, exits)
        with pytest.raises(SpecError) as e:
            eecompile.compile_model(spec, out)
        assert not out.exists()
        return str(e.value)

    gate = {"kind": "max_prob", "threshold": 0.5}
    msg = compile_with([{"at": "rr", "head": str(head), "gate": gate}])
    assert "no tensor 'rr'" in msg and "'r'" in msg and "eecompile analyze" in msg
    msg = compile_with([{"at": "inner", "head": str(head), "gate": gate}])
    assert "inside the body of If" in msg
    msg = compile_with([{"at": "z", "head": str(head), "gate": gate}, {"at": "r", "head": str(head), "gate": gate}])
    assert "exits[1].at" in msg and "graph order" in msg
    wrong = make_head(tmp_path / "w.onnx", [1, 5], 4)
    msg = compile_with([{"at": "r", "head": str(wrong), "gate": gate}])
    assert "exits[0].head" in msg and "'r'" in msg and "5" in msg
    classes = make_head(tmp_path / "c.onnx", [1, 4], 7)
    msg = compile_with([{"at": "r", "head": str(classes), "gate": gate}])
    assert "same number of classes" in msg
    msg = compile_with([{"at": "r", "head": str(tmp_path / "missing.onnx"), "gate": gate}])
    assert "not found" in msg


def test_existing_bundle_needs_force_and_survives_a_failed_compile(tmp_path: Path) -> None:
    model = _save(tmp_path, LOOPED)
    head = make_head(tmp_path / "h.onnx", [1, 4], 4)
    gate = {"kind": "max_prob", "threshold": 0.5}
    good = write_spec(tmp_path, model, [{"at": "r", "head": str(head), "gate": gate}], name="good.yaml")
    out = tmp_path / "b.eebundle"
    eecompile.compile_model(good, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(BundleError, match="--force"):
        eecompile.compile_model(good, out)
    bad = write_spec(tmp_path, model, [{"at": "nope", "head": str(head), "gate": gate}], name="bad.yaml")
    with pytest.raises(SpecError):
        eecompile.compile_model(bad, out, force=True)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_rank4_classifier_class_axis_is_found_without_the_spec(tmp_path: Path) -> None:
    # SqueezeNet's output is [N, 1000, 1, 1]: a softmax over the last axis (size 1) would always fire.
    from conftest import zoo_model

    head = make_head(tmp_path / "h.onnx", [1, 16, 7, 7], 1000, opset=9)
    spec = write_spec(tmp_path, zoo_model("squeezenet"),
                      [{"at": "r11", "head": str(head), "gate": {"kind": "max_prob", "threshold": 0.5}}])
    bundle = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert bundle.manifest.class_axis % 4 == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    res = eecompile.load(bundle.path).run({"data_0": x}, policy="never")
    assert (res.gate_scores[0] < 0.5).all()  # a barely trained head over 1000 classes is not confident
    bad = write_spec(tmp_path, zoo_model("squeezenet"),
                     [{"at": "r11", "head": str(head), "gate": {"kind": "max_prob", "threshold": 0.5}}],
                     {"class_axis": -1}, name="bad.yaml")
    with pytest.raises(SpecError, match="size 1"):
        eecompile.compile_model(bad, tmp_path / "c.eebundle")


def test_score_gate_is_calibrated_and_run(tmp_path: Path) -> None:
    from eecompile.calibrate import calibrate_bundle

    model = _save(tmp_path, SCORED)
    spec = write_spec(tmp_path, model, [{"at": "r", "head": {"output": "aux", "score_output": "conf"},
                                         "gate": {"kind": "score", "threshold": 0.99}}], {"output": "y"})
    bundle = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    x = np.random.default_rng(3).standard_normal((400, 4)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)  # no labels: the drop is disagreement with the final exit
    report = calibrate_bundle(bundle.path, tmp_path / "cal.npz", max_drop=0.05, costs=[1.0, 3.0], quiet=True)
    thr = eecompile.Bundle.load(bundle.path).manifest.thresholds[0]
    assert thr == report.exits[0]["threshold"] and thr != 0.99
    res = eecompile.load(bundle.path).run({"x": x})
    final = eecompile.load(bundle.path).run({"x": x}, thresholds="never").outputs["y"].argmax(1)
    disagree = float((res.outputs["y"].argmax(1) != final).mean())
    assert disagree <= 0.05 + 1e-9  # the budget holds on the calibration data itself
    r = np.maximum(x, 0)
    conf = 1 / (1 + np.exp(-(r @ np.array([1, -1, 0.5, 0], np.float32))))
    np.testing.assert_array_equal(res.exit_index == 0, conf >= thr)


def test_at_list_forces_extra_tensors_onto_the_boundary(tmp_path: Path) -> None:
    model = _save(tmp_path, SCORED)
    gate = {"kind": "max_prob", "threshold": 0.5}
    one = write_spec(tmp_path, model, [{"at": "r", "head": {"output": "aux"}, "gate": gate}], {"output": "y", "drop": ["conf"]},
                     name="one.yaml")
    assert eecompile.compile_model(one, tmp_path / "one.eebundle").manifest.segments[0].carried_out == ["r"]
    # With h2 listed too, segment 0 also computes h2 (the head still reads r), and only h2 crosses.
    two = write_spec(tmp_path, model, [{"at": ["r", "h2"], "head": {"output": "aux"}, "gate": gate}],
                     {"output": "y", "drop": ["conf"]}, name="two.yaml")
    m = eecompile.compile_model(two, tmp_path / "two.eebundle").manifest
    assert m.segments[0].carried_out == ["h2"] and m.segments[0].exit.at == ["r", "h2"]
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    a = eecompile.load(tmp_path / "one.eebundle").run({"x": x}, thresholds="never").outputs["y"]
    b = eecompile.load(tmp_path / "two.eebundle").run({"x": x}, thresholds="never").outputs["y"]
    np.testing.assert_allclose(a, b, rtol=1e-6)
