"""Heads at a time-major cut: an LSTM's ``[T, B, D]`` output (batch axis 1). Heads read their inputs
batch-first (the compiler puts a Transpose in front), so the gate gives one bool per sample; trained heads
are trained on the same batch-first features; and verify refuses a gate that does not give ``[B]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

import eecompile
import eecompile.compiler
import eecompile.passes.attach_heads as attach_heads
from eecompile.errors import GraphError
from eecompile.names import head_input

CUT = "/l1/Transpose_output_0"  # analyze's first suggestion: LSTM output, [t, batch, 16] (batch axis 1)


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from .builders import lstm_classifier

    return lstm_classifier(tmp_path_factory.mktemp("lstm") / "lstm.onnx")


def _spec(tmp: Path, model: Path, head: dict) -> Path:
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": str(model), "exits": [
        {"at": CUT, "head": head, "gate": {"kind": "max_prob", "threshold": 0.5}}]}))
    return spec


def _check_policies(bundle: Path, x: np.ndarray) -> np.ndarray:
    """Mixed thresholds (the gate's median score): compact == wait-all == the rows of the exit each sample
    took as policy never records them; returns the exit index per sample."""
    runner = eecompile.load(bundle)
    probe = runner.run({"x": x}, thresholds=["never"], policy="never")
    assert probe.gate_scores is not None and probe.gate_scores[0].shape == (len(x),)
    th = [float(np.median(probe.gate_scores[0]))]
    base = runner.run({"x": x}, thresholds=th, policy="never")
    assert base.all_exits is not None
    for policy in ("compact", "wait-all"):
        r = runner.run({"x": x}, thresholds=th, policy=policy)
        np.testing.assert_array_equal(r.exit_index, base.exit_index)
        rows = np.stack([base.all_exits[int(e)]["y"][i] for i, e in enumerate(r.exit_index)])
        np.testing.assert_allclose(r.outputs["y"], rows, rtol=1e-6, atol=1e-6)
    forced = runner.run({"x": x}, thresholds=["always"])
    assert (forced.exit_index == 0).all()
    np.testing.assert_allclose(forced.outputs["y"], base.all_exits[0]["y"], rtol=1e-6, atol=1e-6)
    zero = runner.run({"x": x}, thresholds=[0.0])  # every max_prob score >= 0: every sample leaves at exit 0
    assert zero.exit_index.tolist() == [0] * len(x)
    runner.close()
    return base.exit_index


@pytest.mark.slow
def test_trained_head_at_a_time_major_cut_trains_and_exits_per_sample(lstm: Path, tmp_path: Path) -> None:
    from eecompile.train import train_heads

    spec = _spec(tmp_path, lstm, {"kind": "linear", "options": {"pool": "mean"}})
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    hs = b.manifest.segments[0].exit.head_spec
    assert hs is not None and hs["feature_shape"][0] == "batch" and hs["inputs"] == [head_input(0, 0)]
    x = np.random.default_rng(0).standard_normal((200, 6, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = train_heads(b.path, tmp_path / "d.npz", epochs=20, quiet=True)
    (h,) = report.heads
    assert h.agree_after > max(h.agree_before, 0.5)  # it learned from the batch-first features
    trained = eecompile.load(b.path).manifest.segments[0].exit.head_spec
    assert trained is not None and trained["trained"] and trained["inputs"] == [head_input(0, 0)]
    mixed = set()
    for n in (1, 4, 9):
        xs = np.random.default_rng(n).standard_normal((n, 6, 8)).astype(np.float32)
        mixed |= set(_check_policies(b.path, xs).tolist())
    assert mixed == {0, 1}, "the median threshold should send some samples on and let others leave"


def _head_file(path: Path) -> Path:
    """A head file written batch-first: features [B, T, 16] -> mean over T -> MatMul -> logits [B, 5]."""
    w = np.random.default_rng(3).standard_normal((16, 5)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["f"], ["p"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["p", "w"], ["logits"])],
        "head", [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["B", "T", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 5])],
        [onnx.numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], ir_version=8), path)
    return path


def test_head_file_reads_the_cut_batch_first(lstm: Path, tmp_path: Path) -> None:
    head = _head_file(tmp_path / "head.onnx")
    b = eecompile.compile_model(_spec(tmp_path, lstm, {"file": str(head)}), tmp_path / "b.eebundle")
    w = onnx.numpy_helper.to_array(onnx.load(head).graph.initializer[0])
    for n in (1, 4):
        x = np.random.default_rng(n).standard_normal((n, 6, 8)).astype(np.float32)
        runner = eecompile.load(b.path)
        r = runner.run({"x": x}, thresholds=["never"], policy="never", extra_outputs={0: [head_input(0, 0)]})
        feat = r.extra[0][head_input(0, 0)]
        assert feat.shape == (n, 6, 16)  # the batch-first view of the [6, n, 16] cut
        assert r.all_exits is not None
        np.testing.assert_allclose(r.all_exits[0]["y"], feat.mean(axis=1) @ w, rtol=1e-4, atol=1e-5)
        runner.close()
        _check_policies(b.path, x)


def test_verify_refuses_a_gate_that_is_not_one_bool_per_sample(lstm: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the batch-first views (how it was before), the head pools the time-major cut over its batch axis
    # and the gate gives one bool per time step: verify must refuse it and write nothing.
    def no_views(pm, k, at):  # noqa: ANN001, ANN202
        return [attach_heads.HeadView(n, 0, n, pm.shape_of(n)) for n in at]

    monkeypatch.setattr(eecompile.compiler, "head_views", no_views)
    monkeypatch.setattr(attach_heads, "head_views", no_views)
    spec = _spec(tmp_path, lstm, {"kind": "linear", "options": {"pool": "mean"}})
    with pytest.raises(GraphError, match=r"segment 0's gate 'ee0\.gate' has shape \[\d+\] for a batch of 1, "
                                         r"expected \[1\] \(one bool per sample\)"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert not (tmp_path / "b.eebundle").exists()


@pytest.mark.slow
def test_train_heads_trains_a_head_file_on_the_batch_first_view(lstm: Path, tmp_path: Path) -> None:
    """A head file at a time-major cut is trained on what it reads in the graph: the batch-first view."""
    from eecompile.train import train_heads

    head = onnx.load(_head_file(tmp_path / "head.onnx"))  # plus a bias (the untrained LSTM favours one class),
    w = head.graph.initializer[0]  # and small weights: the LSTM's logits differ by ~0.1 between classes
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 0.01, w.name))
    head.graph.node[1].output[0] = "mm"
    head.graph.node.append(helper.make_node("Add", ["mm", "bias"], ["logits"]))
    head.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(5, np.float32), "bias"))
    onnx.save(head, tmp_path / "head_b.onnx")
    b = eecompile.compile_model(_spec(tmp_path, lstm, {"file": str(tmp_path / "head_b.onnx")}), tmp_path / "b.eebundle")
    x = np.random.default_rng(0).standard_normal((200, 6, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    (h,) = train_heads(b.path, tmp_path / "d.npz", epochs=20, quiet=True).heads
    assert h.kind == "file" and h.agree_after > max(h.agree_before, 0.5), h
    _check_policies(b.path, x[:9])
