"""No model output is dropped without a word: every model output is a final output (``final.outputs``: each
exit's head file gives it, by output name; or ``final.end_only``: computed for the samples that reach the final
exit and absent, ``present.<name>`` False and NaN rows, for the others), an exit head's output inside the
model, or listed in ``final.drop``; a spec that leaves one undefined is refused with one line naming them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.errors import SpecError

from .builders import yolo_detector
from .check import check_bundle

CUT = "/c1/c1.1/LeakyRelu_output_0"


def _spec(tmp: Path, model: Path, final: dict) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(yaml.safe_dump({"model": str(model), "final": final, "exits": [
        {"at": CUT, "head": {"output": "aux0"}, "gate": {"kind": "max_prob", "threshold": 0.6}}]}))
    return p


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    return yolo_detector(tmp_path_factory.mktemp("yolo") / "model.onnx")


def test_outputs_without_a_value_at_the_exits_are_refused(detector: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"outputs \['det_small', 'det_big'\] have no value at the exits.*"
                                        r"final: \{drop: \[det_small, det_big\]\}"):
        eecompile.compile_model(_spec(tmp_path, detector, {"output": "cls"}), tmp_path / "b.eebundle")
    with pytest.raises(SpecError, match="final.drop: \\['boxes'\\] are not model outputs"):
        eecompile.compile_model(_spec(tmp_path, detector, {"output": "cls", "drop": ["boxes"]}),
                                tmp_path / "b.eebundle")
    assert not (tmp_path / "b.eebundle").exists()


def test_detector_at_batch_1_with_dropped_outputs(detector: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, detector, {"output": "cls", "drop": ["det_small", "det_big"]})
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert any("['det_small', 'det_big'] are not in the bundle" in n for n in b.manifest.notes)
    # torch wrote the batch-1 Reshape targets as Constant nodes: they get batch 0 ("copy") like initializers do
    assert b.manifest.batch_mode == "dynamic", b.manifest.notes
    assert [t.name for t in b.manifest.outputs] == ["cls"]
    feeds = {"images": np.random.default_rng(4).standard_normal((5, 3, 32, 32)).astype(np.float32)}
    check_bundle(detector, b.path, feeds, "cls", ["aux0"])


def _feeds(n: int = 6, seed: int = 4) -> dict[str, np.ndarray]:
    return {"images": np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)}


def _with_cut(model: Path, path: Path) -> Path:
    """``model`` with the cut tensor as one more output (the head files' input, for their reference rows)."""
    import onnx

    m = onnx.load(str(model))
    m.graph.output.append(onnx.helper.make_tensor_value_info(CUT, onnx.TensorProto.FLOAT, [1, 16, 16, 16]))
    onnx.save(m, path)
    return path


def _reference(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from .check import reference

    return reference(model, feeds)


def _detector_head(path: Path, outputs: tuple[str, ...] = ("logits", "det_small", "det_big"), seed: int = 9) -> Path:
    """A head file for the detector's cut [N, 16, 16, 16]: class logits [N, 4] (pool + Gemm) and, by name, the
    two detection outputs (a Conv + Sigmoid each, [N, 27, 8, 8] and [N, 27, 16, 16]: the outputs' per-sample
    sizes, reshaped by the compiler to [3, 8, 8, 9] and [3, 16, 16, 9])."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return nh.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [h.make_node("GlobalAveragePool", ["x"], ["gp"]), h.make_node("Flatten", ["gp"], ["fl"]),
             h.make_node("Gemm", ["fl", "fw", "fb"], ["logits"], transB=1),
             h.make_node("Conv", ["x", "sw", "sb"], ["s_raw"], strides=[2, 2], pads=[1, 1, 1, 1]),
             h.make_node("Sigmoid", ["s_raw"], ["det_small"]),
             h.make_node("Conv", ["x", "bw", "bb"], ["b_raw"], pads=[1, 1, 1, 1]),
             h.make_node("Sigmoid", ["b_raw"], ["det_big"])]
    shapes = {"logits": ["N", 4], "det_small": ["N", 27, 8, 8], "det_big": ["N", 27, 16, 16]}
    g = h.make_graph(nodes, "det_head", [h.make_tensor_value_info("x", T.FLOAT, ["N", 16, 16, 16])],
                     [h.make_tensor_value_info(o, T.FLOAT, shapes[o]) for o in outputs],
                     [w("fw", 4, 16), w("fb", 4), w("sw", 27, 16, 3, 3), w("sb", 27), w("bw", 27, 16, 3, 3),
                      w("bb", 27)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return path


def _head_rows(detector: Path, head: Path, feeds: dict[str, np.ndarray], tmp: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    cut = _reference(_with_cut(detector, tmp / "with_cut.onnx"), feeds)[CUT]
    sess = ort.InferenceSession(str(head), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": cut}), strict=True))


def test_every_output_needs_a_value_at_every_exit_or_is_end_only(detector: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"exits\[0\].head: the final outputs \['det_small', 'det_big'\] have no "
                                        r"value at this exit \(an in-model head gives only 'cls'\).*final.end_only"):
        eecompile.compile_model(_spec(tmp_path, detector, {"outputs": ["cls", "det_small", "det_big"]}),
                                tmp_path / "b.eebundle")
    spec = tmp_path / "head.yaml"
    head = _detector_head(tmp_path / "head.onnx", outputs=("logits", "det_small"))
    spec.write_text(yaml.safe_dump({"model": str(detector), "final": {"outputs": ["cls", "det_small", "det_big"],
                                                                      "drop": ["aux0"]},
                                    "exits": [{"at": CUT, "head": str(head),
                                               "gate": {"kind": "max_prob", "threshold": 0.6}}]}))
    with pytest.raises(SpecError, match=r"the final outputs \['det_big'\] need a value at this exit, and the "
                                        r"head file has no output named so \(it has \['logits', 'det_small'\]\)"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
    with pytest.raises(SpecError, match="is the output the gates read"):
        eecompile.compile_model(_spec(tmp_path, detector, {"output": "cls", "end_only": ["cls"]}),
                                tmp_path / "b.eebundle")
    with pytest.raises(SpecError, match=r"final.end_only: \['boxes'\] are not model outputs"):
        eecompile.compile_model(_spec(tmp_path, detector, {"output": "cls", "end_only": ["boxes"]}),
                                tmp_path / "b.eebundle")
    with pytest.raises(SpecError, match="give final.output .* or final.outputs"):
        eecompile.compile_model(_spec(tmp_path, detector, {"output": "cls", "outputs": ["cls"]}),
                                tmp_path / "b.eebundle")
    with pytest.raises(SpecError, match=r"also in final.drop"):
        eecompile.compile_model(_spec(tmp_path, detector, {"output": "cls", "end_only": ["det_small", "det_big"],
                                                           "drop": ["det_big"]}), tmp_path / "b.eebundle")
    assert not (tmp_path / "b.eebundle").exists()


def test_detector_end_only_outputs_are_absent_for_early_exits(detector: Path, tmp_path: Path) -> None:
    """A built-in (here: in-model) head gives the scores; the boxes only come from the final exit."""
    from click.testing import CliRunner

    from eecompile.cli import cli

    spec = _spec(tmp_path, detector, {"output": "cls", "end_only": ["det_small", "det_big"]})
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    m = b.manifest
    assert [t.name for t in m.outputs] == ["cls", "det_small", "det_big"] and m.end_only == ["det_small", "det_big"]
    assert list(m.segments[0].exit.outputs) == ["cls"] and set(m.segments[1].exit.outputs) == {n.name for n in m.outputs}
    assert any("computed only for samples that reach the final exit" in n for n in m.notes)
    feeds = _feeds()
    ref = _reference(detector, feeds)
    runner = eecompile.load(b.path)
    never = runner.run(feeds, thresholds="never")
    for name in ("cls", "det_small", "det_big"):
        np.testing.assert_allclose(never.outputs[name], ref[name], rtol=1e-5, atol=1e-6)
        assert never.present.get(name, np.ones(6, bool)).all()
    forced = runner.run(feeds, thresholds="always")
    np.testing.assert_allclose(forced.outputs["cls"], ref["aux0"], rtol=1e-5, atol=1e-6)
    assert not forced.present["det_small"].any() and np.isnan(forced.outputs["det_big"]).all()
    probe = runner.run(feeds, thresholds="never", policy="never")
    assert probe.gate_scores is not None and probe.all_exits is not None
    assert set(probe.all_exits[0]) == {"cls"}  # exit 0 gives no boxes
    mixed = [float(np.median(probe.gate_scores[0]))]
    base = runner.run(feeds, thresholds=mixed, policy="never")
    reached = base.exit_index == 1
    assert 0 < int(reached.sum()) < 6
    for policy in ("compact", "wait-all"):
        r = runner.run(feeds, thresholds=mixed, policy=policy)
        np.testing.assert_array_equal(r.exit_index, base.exit_index)
        for name in ("det_small", "det_big"):
            np.testing.assert_array_equal(r.present[name], reached)
            np.testing.assert_array_equal(base.present[name], reached)
            np.testing.assert_allclose(r.outputs[name][reached], ref[name][reached], rtol=1e-5, atol=1e-6)
            assert np.isnan(r.outputs[name][~reached]).all() and np.isnan(base.outputs[name][~reached]).all()
        np.testing.assert_allclose(r.outputs["cls"], np.where(reached[:, None], ref["cls"], ref["aux0"]),
                                   rtol=1e-5, atol=1e-6)
    # `eecompile run` writes the masks beside the outputs, batch by batch.
    np.savez(tmp_path / "in.npz", **feeds)
    res = CliRunner().invoke(cli, ["run", str(b.path), "--data", str(tmp_path / "in.npz"), "-o",
                                   str(tmp_path / "out.npz"), "--batch", "4", "--thresholds", str(mixed[0])])
    assert res.exit_code == 0, res.output
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(out["present.det_big"], reached)
    np.testing.assert_array_equal(out["exit_index"], base.exit_index)
    np.testing.assert_allclose(out["det_big"][reached], ref["det_big"][reached], rtol=1e-5, atol=1e-6)
    assert np.isnan(out["det_big"][~reached]).all()


def test_detector_head_file_gives_every_output(detector: Path, tmp_path: Path) -> None:
    """A head file with outputs named after the model's gives them at its exit: every sample gets every
    output, from the exit it took; compact == wait-all == the rows of the exit each sample took."""
    head = _detector_head(tmp_path / "head.onnx")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": str(detector), "final": {"outputs": ["det_small", "cls", "det_big"],
                                                                      "gate_on": "cls", "drop": ["aux0"]},
                                    "exits": [{"at": CUT, "head": str(head),
                                               "gate": {"kind": "max_prob", "threshold": 0.6}}]}))
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    m = b.manifest
    assert [t.name for t in m.outputs] == ["cls", "det_small", "det_big"] and m.end_only == []
    assert set(m.segments[0].exit.outputs) == {"cls", "det_small", "det_big"}
    feeds = _feeds()
    ref = _reference(detector, feeds)
    rows = _head_rows(detector, head, feeds, tmp_path)
    want = {"cls": rows["logits"], "det_small": rows["det_small"].reshape(6, 3, 8, 8, 9),
            "det_big": rows["det_big"].reshape(6, 3, 16, 16, 9)}
    runner = eecompile.load(b.path)
    forced = runner.run(feeds, thresholds="always")
    assert forced.present == {}
    for name, v in want.items():
        np.testing.assert_allclose(forced.outputs[name], v, rtol=1e-5, atol=1e-6)
    check_bundle(detector, b.path, feeds, "cls", [None])  # never == the model; mixed: compact == wait-all == rows
    probe = runner.run(feeds, thresholds="never", policy="never")
    assert probe.gate_scores is not None
    mixed = [float(np.median(probe.gate_scores[0]))]
    r = runner.run(feeds, thresholds=mixed, policy="compact")
    early = r.exit_index == 0
    assert 0 < int(early.sum()) < 6
    for name in want:
        np.testing.assert_allclose(r.outputs[name][early], want[name][early], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.outputs[name][~early], ref[name][~early], rtol=1e-5, atol=1e-6)


def test_step_model_next_state_is_end_only(tmp_path: Path) -> None:
    """A recurrent step model (torch GRUCell: input and state in, logits and next state out): the exit gives
    the logits; the next state is only computed by the samples that run the whole step."""
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(3)

    class Step(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.cell = nn.GRUCell(16, 16)
            self.mid = nn.Linear(16, 16)
            self.out = nn.Linear(16, 5)
            self.aux = nn.Linear(16, 5)

        def forward(self, x, h):  # noqa: ANN001, ANN202
            a = torch.relu(self.inp(x))
            h2 = self.cell(a, h)
            z = torch.relu(self.mid(h2)) * 3.0
            return self.out(z), h2 + z, self.aux(a) * 3.0

    path = tmp_path / "step.onnx"
    torch.onnx.export(Step().eval(), (torch.randn(2, 6), torch.randn(2, 16)), str(path), input_names=["x", "h"],
                      output_names=["logits", "h_next", "aux0"], opset_version=14, dynamo=False,
                      dynamic_axes={n: {0: "batch"} for n in ("x", "h", "logits", "h_next", "aux0")})
    import onnx

    relu = next(n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Relu")
    exits = [{"at": relu, "head": {"output": "aux0"}, "gate": {"kind": "max_prob", "threshold": 0.5}}]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "step.onnx", "final": {"outputs": ["logits", "h_next"]}, "exits": exits}))
    with pytest.raises(SpecError, match=r"exits\[0\].head: the final outputs \['h_next'\] have no value"):
        eecompile.compile_model(bad, tmp_path / "bad.eebundle")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": "step.onnx", "final": {"output": "logits", "end_only": ["h_next"]},
                                    "exits": exits}))
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((8, 6)).astype(np.float32), "h": rng.standard_normal((8, 16)).astype(np.float32)}
    ref = _reference(path, feeds)
    runner = eecompile.load(b.path)
    probe = runner.run(feeds, thresholds="never", policy="never")
    assert probe.gate_scores is not None
    mixed = [float(np.median(probe.gate_scores[0]))]
    for policy in ("compact", "wait-all", "never"):
        r = runner.run(feeds, thresholds=mixed, policy=policy)
        reached = r.exit_index == 1
        assert 0 < int(reached.sum()) < 8
        np.testing.assert_array_equal(r.present["h_next"], reached)
        np.testing.assert_allclose(r.outputs["h_next"][reached], ref["h_next"][reached], rtol=1e-5, atol=1e-6)
        assert np.isnan(r.outputs["h_next"][~reached]).all()
        np.testing.assert_allclose(r.outputs["logits"], np.where(reached[:, None], ref["logits"], ref["aux0"]),
                                   rtol=1e-5, atol=1e-6)


def test_served_answers_say_which_rows_are_absent(detector: Path, tmp_path: Path) -> None:
    """The serving path (one runner call for several requests, answered as rows exit): end-only rows of samples
    that left early are NaN with ``present.<name>`` in an .npz answer and ``null`` in JSON."""
    import io
    import json

    from eecompile.serve.batching import run_group
    from eecompile.serve.protocol import PredictRequest, encode_response

    spec = _spec(tmp_path, detector, {"output": "cls", "end_only": ["det_small", "det_big"]})
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    feeds = _feeds(n=6)
    ref = _reference(detector, feeds)
    runner = eecompile.load(b.path)
    probe = runner.run(feeds, thresholds="never", policy="never")
    assert probe.gate_scores is not None
    mixed = (float(np.median(probe.gate_scores[0])),)
    reached = runner.run(feeds, thresholds=list(mixed)).exit_index == 1
    requests = [PredictRequest({"images": feeds["images"][i:j]}, j - i, mixed, False) for i, j in ((0, 2), (2, 6))]
    answers: dict = {}
    run_group(runner, requests, lambda i, a: answers.__setitem__(i, a))
    for i, (lo, hi) in enumerate(((0, 2), (2, 6))):
        a = answers[i]
        mask, axis = a.present["det_big"]
        np.testing.assert_array_equal(mask, reached[lo:hi])
        assert axis == 0 and np.isnan(a.outputs["det_big"][~mask]).all()
        np.testing.assert_allclose(a.outputs["det_big"][mask], ref["det_big"][lo:hi][mask], rtol=1e-5, atol=1e-6)
        body, _ = encode_response(a.outputs, a.exit_index, True, a.present)
        npz = np.load(io.BytesIO(body))
        np.testing.assert_array_equal(npz["present.det_small"], reached[lo:hi])
        doc = json.loads(encode_response(a.outputs, a.exit_index, False, a.present)[0])
        assert doc["present"]["det_big"] == reached[lo:hi].tolist()
        assert [r is None for r in doc["outputs"]["det_big"]] == (~reached[lo:hi]).tolist()
