"""Heads and models at different opsets, and gates valid at every opset a model can have (7 upwards).

An old model (opset 8, IR 3: the model zoo's mnist-8 shape) with a head written today (opset 17,
LayerNormalization) gets segments at the newer opset: the model's part is up-converted, never the head
down-converted. A head written for an old opset is up-converted to a newer model's opset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import yaml
from onnx_ir.tape import Tape

import eecompile
from eecompile.passes.gates import build_gate
from eecompile.spec import GateKind

from .builders import opset8_cnn, pooled_head, with_head_output
from .check import check_bundle


def _gate_model(kind: GateKind, opset: int, c: int = 5) -> bytes:
    shape = ["batch", c]
    x = ir.Value(name="logits", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
    tape = Tape()
    res = build_gate(tape, 0, kind, x, shape, -1, opset)
    res.gate.dtype, res.score.dtype = ir.DataType.BOOL, ir.DataType.FLOAT
    res.gate.shape = res.score.shape = ir.Shape(["batch"])
    g = ir.Graph([x, res.threshold], [res.gate, res.score], nodes=tape.nodes, opset_imports={"": opset},
                 initializers=tape.initializers, name="gate")
    proto = ir.to_proto(ir.Model(g, ir_version=8))
    onnx.checker.check_model(proto, full_check=True)  # every node exists at this opset
    return proto.SerializeToString()


@pytest.mark.parametrize("opset", [7, 8, 9, 11])
@pytest.mark.parametrize("kind", [GateKind.MAX_PROB, GateKind.ENTROPY, GateKind.MARGIN])
def test_gates_are_valid_and_nan_safe_at_old_opsets(kind: GateKind, opset: int) -> None:
    sess = ort.InferenceSession(_gate_model(kind, opset), providers=["CPUExecutionProvider"])
    x = np.array([[9, 0, 0, 0, 0], [1, 1, 1, 1, 1], [np.nan, 0, 0, 0, 0], [np.inf, 0, 0, 0, 0],
                  [0, -np.inf, 0, 0, 0]], np.float32)
    loose = {GateKind.MAX_PROB: 0.0, GateKind.MARGIN: 0.0, GateKind.ENTROPY: 1.0}[kind]
    for thr, want in [(loose, [True, True, False, False, False]),
                      (-math.inf if kind.fires_above else math.inf, [True, True, False, False, False]),
                      (math.inf if kind.fires_above else -math.inf, [False] * 5)]:
        gate, score = sess.run(None, {"logits": x, "ee0.threshold": np.array(thr, np.float32)})
        assert gate.tolist() == want, (thr, score)
    assert np.isnan(score[2:]).all()  # non-finite logits poison the score, and a NaN score never fires


def _spec(tmp: Path, model: Path, exits: list[dict], final: str) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(yaml.safe_dump({"model": str(model), "exits": exits, "final": {"output": final}}))
    return p


def _feeds(n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    return {"Input3": np.random.default_rng(seed).random((n, 1, 28, 28)).astype(np.float32)}


def _segment_opsets(bundle: Path) -> list[int]:
    out = []
    for f in sorted((bundle / "segments").glob("seg*.onnx")):
        m = onnx.load(str(f), load_external_data=False)
        onnx.checker.check_model(m, full_check=True)
        out.append(next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")))
    return out


@pytest.mark.parametrize("gate", ["max_prob", "entropy", "margin"])
def test_opset8_model_with_opset8_head_keeps_opset_8(gate: str, tmp_path: Path) -> None:
    model = opset8_cnn(tmp_path / "m.onnx")
    head = pooled_head(tmp_path / "h.onnx", 8, 10, opset=8)
    thr = {"max_prob": 0.5, "entropy": 0.5, "margin": 0.2}[gate]
    spec = _spec(tmp_path, model, [{"at": "ReLU32_Output_0", "head": str(head), "gate": {"kind": gate,
                                                                                       "threshold": thr}}],
                 "Plus214_Output_0")
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert _segment_opsets(b.path) == [8, 8]
    ref = with_head_output(model, head, "ReLU32_Output_0", "aux0", tmp_path / "ref.onnx")
    check_bundle(ref, b.path, _feeds(), "Plus214_Output_0", ["aux0"])


@pytest.mark.parametrize("head_opset,layernorm", [(13, False), (17, True)])
def test_opset8_model_with_a_newer_head_raises_the_segment_opset(head_opset: int, layernorm: bool,
                                                                   tmp_path: Path) -> None:
    model = opset8_cnn(tmp_path / "m.onnx")
    head = pooled_head(tmp_path / "h.onnx", 8, 10, opset=head_opset, layernorm=layernorm)
    spec = _spec(tmp_path, model, [{"at": "ReLU32_Output_0", "head": str(head),
                                    "gate": {"kind": "margin", "threshold": 0.2}}], "Plus214_Output_0")
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert _segment_opsets(b.path) == [head_opset, 8]  # only the segment holding the head is raised
    assert any(f"opset {head_opset}" in n for n in b.manifest.notes)
    ref = with_head_output(model, head, "ReLU32_Output_0", "aux0", tmp_path / "ref.onnx")
    check_bundle(ref, b.path, _feeds(), "Plus214_Output_0", ["aux0"])


def test_trained_conv_head_on_an_opset8_model(tmp_path: Path) -> None:
    model = opset8_cnn(tmp_path / "m.onnx")
    spec = _spec(tmp_path, model, [{"at": "ReLU32_Output_0", "head": {"kind": "conv"},
                                    "gate": {"kind": "max_prob", "threshold": 0.5}}], "Plus214_Output_0")
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert _segment_opsets(b.path)[1] == 8
    res = eecompile.load(b.path).run(_feeds(), thresholds="never")
    close_ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = np.concatenate([close_ref.run(None, {"Input3": x[None]})[0] for x in _feeds()["Input3"]])
    np.testing.assert_allclose(res.outputs["Plus214_Output_0"], want, rtol=1e-5, atol=1e-5)


def test_old_head_on_a_new_model_is_up_converted(tmp_path: Path) -> None:
    from onnx import version_converter

    old = opset8_cnn(tmp_path / "m8.onnx")
    model = tmp_path / "m13.onnx"
    onnx.save(version_converter.convert_version(onnx.load(str(old)), 13), model)
    head = pooled_head(tmp_path / "h.onnx", 8, 10, opset=8)
    spec = _spec(tmp_path, model, [{"at": "ReLU32_Output_0", "head": str(head),
                                    "gate": {"kind": "max_prob", "threshold": 0.5}}], "Plus214_Output_0")
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert _segment_opsets(b.path) == [13, 13]
    ref = with_head_output(model, head, "ReLU32_Output_0", "aux0", tmp_path / "ref.onnx")
    check_bundle(ref, b.path, _feeds(), "Plus214_Output_0", ["aux0"])


@pytest.mark.parametrize("opset", [7, 8])
def test_patience_gate_is_valid_at_old_opsets(opset: int) -> None:
    sess = ort.InferenceSession(_gate_model(GateKind.PATIENCE, opset), providers=["CPUExecutionProvider"])
    x = np.array([[9, 0, 0, 0, 0], [1, 1, 1, 1, 1], [np.nan, 0, 0, 0, 0]], np.float32)
    gate, score = sess.run(None, {"logits": x, "ee0.threshold": np.array(1.0, np.float32)})
    assert gate.tolist() == [True, True, False] and score[:2].tolist() == [1.0, 1.0]
