"""FLOPs inside Loop, Scan and If bodies are counted (times the trip count), so ``analyze`` gives true
fractions for recurrent graphs exported as loops; such graphs compile and run at a cut before the loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.analysis.probe import DEFAULT_DIM
from eecompile.compiler import analyze_model, prepare

from .builders import GRU_C, GRU_D, GRU_H, gru_loop
from .check import check_bundle


def test_loop_body_flops_are_counted(tmp_path: Path) -> None:
    model = gru_loop(tmp_path / "m.onnx")
    t = DEFAULT_DIM  # the symbolic sequence length while probing
    before = 2 * t * GRU_D * GRU_H
    loop = t * 2 * (2 * GRU_H * GRU_H)
    heads = 2 * (2 * GRU_H * GRU_C)
    pm = prepare(model)
    assert pm.total_flops == before + loop + heads
    loop_node = next(i for i, n in enumerate(pm.index.nodes) if n.op_type == "Loop")
    assert pm.node_flops[loop_node] == loop
    report = analyze_model(model)
    xr = next(c for c in report.cut_points if c.tensor == "xr")
    assert xr.fraction == pytest.approx(before / (before + loop + heads))  # 26%, not the 86% of before


def test_gru_loop_compiles_and_runs(tmp_path: Path) -> None:
    model = gru_loop(tmp_path / "m.onnx")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": str(model), "final": {"output": "logits"}, "exits": [
        {"at": ["xr"], "head": {"output": "aux0"}, "gate": {"kind": "margin", "threshold": 0.3}}]}))
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert b.manifest.segments[0].flops_fraction < 0.5
    feeds = {"x": np.random.default_rng(1).standard_normal((7, 5, GRU_D)).astype(np.float32)}
    check_bundle(model, b.path, feeds, "logits", ["aux0"])


def _scan_rnn(path: Path) -> Path:
    """x [B, T, 4] -> MatMul 4x8 -> transpose to [T, B, 8] -> Scan (state h [B, 8]: h = tanh(x_t + h @ W))
    -> MatMul 8x3. Per sample: 2*T*4*8 + T*2*8*8 + 2*8*3 FLOPs."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("Wi", (4, 8)), ("W", (8, 8)), ("Wo", (8, 3))]]
    body = h.make_graph([h.make_node("MatMul", ["h", "W"], ["hw"]), h.make_node("Add", ["hw", "xt"], ["s"]),
                         h.make_node("Tanh", ["s"], ["h2"]), h.make_node("Identity", ["h2"], ["y"])], "body",
                        [h.make_tensor_value_info("h", T.FLOAT, ["B", 8]),
                         h.make_tensor_value_info("xt", T.FLOAT, ["B", 8])],
                        [h.make_tensor_value_info("h2", T.FLOAT, ["B", 8]),
                         h.make_tensor_value_info("y", T.FLOAT, ["B", 8])])
    nodes = [h.make_node("MatMul", ["x", "Wi"], ["xi"]), h.make_node("Relu", ["xi"], ["xr"]),
             h.make_node("Transpose", ["xr"], ["xtm"], perm=[1, 0, 2]),
             h.make_node("ReduceMean", ["xr"], ["h0"], axes=[1], keepdims=0),
             h.make_node("Scan", ["h0", "xtm"], ["hT", "ys"], body=body, num_scan_inputs=1),
             h.make_node("MatMul", ["hT", "Wo"], ["logits"]), h.make_node("MatMul", ["h0", "Wo"], ["aux"])]
    g = h.make_graph(nodes, "scan_rnn", [h.make_tensor_value_info("x", T.FLOAT, ["B", "T", 4])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["B", 3]),
                      h.make_tensor_value_info("aux", T.FLOAT, ["B", 3])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return path


def test_scan_body_flops_are_counted(tmp_path: Path) -> None:
    t = DEFAULT_DIM
    pm = prepare(_scan_rnn(tmp_path / "m.onnx"))
    scan = next(i for i, n in enumerate(pm.index.nodes) if n.op_type == "Scan")
    assert pm.node_flops[scan] == t * 2 * 8 * 8
    assert pm.total_flops == 2 * t * 4 * 8 + t * 2 * 8 * 8 + 2 * (2 * 8 * 3)


def test_analyze_suggests_lstm_cuts_that_compile(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from .builders import lstm_classifier

    model = lstm_classifier(tmp_path / "lstm.onnx")
    report = analyze_model(model)
    assert report.suggested
    lstm = [i for i, n in enumerate(prepare(model).index.nodes) if n.op_type == "LSTM"]
    assert len(lstm) == 2
    for k, cut in enumerate(report.suggested):
        spec = tmp_path / f"s{k}.yaml"
        spec.write_text(yaml.safe_dump({"model": str(model), "exits": [
            {"at": cut, "head": {"kind": "linear", "options": {"pool": "mean"}},
             "gate": {"kind": "max_prob", "threshold": 0.5}}]}))
        b = eecompile.compile_model(spec, tmp_path / f"b{k}.eebundle")  # verify passes at every suggestion
        x = np.random.default_rng(k).standard_normal((4, 6, 8)).astype(np.float32)
        forced = eecompile.load(b.path).run({"x": x}, thresholds="always")
        assert forced.outputs["y"].shape == (4, 5) and (forced.exit_index == 0).all()
