"""Gates computed in the graph, checked number by number against numpy with ONNX Runtime, at an old opset
(9: attribute-style Reduce/TopK, no GreaterOrEqual) and a new one (18: axes as inputs)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.tape import Tape

from eecompile.passes.gates import build_gate
from eecompile.spec import GateKind


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _run_gate(kind: GateKind, logits: np.ndarray, threshold: float, opset: int, class_axis: int = -1,
              state: dict[str, np.ndarray] | None = None, emit_patience: bool = False) -> dict[str, np.ndarray]:
    shape = ["batch", *logits.shape[1:]]
    x = ir.Value(name="logits", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
    tape = Tape()
    res = build_gate(tape, 1, kind, x, shape, class_axis, opset, prev_k=0 if state else None,
                     emit_patience_state=emit_patience)
    outs = [res.gate, res.score, *res.state_outputs]
    for v in outs:
        if v.dtype is None:
            v.dtype = ir.DataType.BOOL if v.name.endswith("gate") else (
                ir.DataType.INT64 if v.name.endswith("argmax") else ir.DataType.FLOAT)
    g = ir.Graph([x, *res.state_inputs, res.threshold], outs, nodes=tape.nodes, opset_imports={"": opset})
    model = ir.Model(g, ir_version=8)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"logits": logits.astype(np.float32), "ee1.threshold": np.array(threshold, np.float32)}
    feeds.update(state or {})
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


OPSETS = [9, 18]


@pytest.mark.parametrize("opset", OPSETS)
def test_max_prob(opset: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 5)) * 3
    out = _run_gate(GateKind.MAX_PROB, x, 0.6, opset)
    p = _softmax(x).max(-1)
    np.testing.assert_allclose(out["ee1.score"], p, rtol=1e-5)
    np.testing.assert_array_equal(out["ee1.gate"], p >= 0.6)
    assert 0 < out["ee1.gate"].sum() < 16


@pytest.mark.parametrize("opset", OPSETS)
def test_entropy_is_normalised_and_fires_below(opset: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 7)) * 2
    out = _run_gate(GateKind.ENTROPY, x, 0.5, opset)
    p = _softmax(x)
    h = -(p * np.log(p)).sum(-1) / np.log(7)
    np.testing.assert_allclose(out["ee1.score"], h, rtol=1e-4)
    np.testing.assert_array_equal(out["ee1.gate"], h <= 0.5)
    uniform = _run_gate(GateKind.ENTROPY, np.zeros((2, 7)), 0.99, opset)
    np.testing.assert_allclose(uniform["ee1.score"], 1.0, rtol=1e-5)


@pytest.mark.parametrize("opset", OPSETS)
def test_margin(opset: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 6)) * 2
    out = _run_gate(GateKind.MARGIN, x, 0.3, opset)
    p = np.sort(_softmax(x), -1)
    m = p[:, -1] - p[:, -2]
    np.testing.assert_allclose(out["ee1.score"], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["ee1.gate"], m >= 0.3)


@pytest.mark.parametrize("opset", OPSETS)
def test_token_logits_use_the_least_confident_position(opset: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 5)) * 3  # [B, T, C]
    out = _run_gate(GateKind.MAX_PROB, x, 0.5, opset)
    np.testing.assert_allclose(out["ee1.score"], _softmax(x).max(-1).min(-1), rtol=1e-5)


@pytest.mark.parametrize("opset", OPSETS)
def test_rank4_classifier_with_class_axis_1(opset: int) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 10, 1, 1)) * 3  # [N, 1000, 1, 1]-style output
    out = _run_gate(GateKind.MAX_PROB, x, 0.5, opset, class_axis=1)
    np.testing.assert_allclose(out["ee1.score"], _softmax(x[:, :, 0, 0]).max(-1), rtol=1e-5)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("kind", [GateKind.MAX_PROB, GateKind.ENTROPY, GateKind.MARGIN])
def test_nonfinite_logits_never_fire(kind: GateKind, opset: int) -> None:
    x = np.array([[np.nan, 1, 2], [np.inf, 0, 0], [-np.inf, 5, 0], [10, 0, 0]], dtype=np.float32)
    always = 0.0 if kind.fires_above else 1.0  # a threshold every finite row passes
    out = _run_gate(kind, x, always, opset)
    np.testing.assert_array_equal(out["ee1.gate"], [False, False, False, True])


@pytest.mark.parametrize("opset", OPSETS)
def test_patience_counts_consecutive_agreement(opset: int) -> None:
    x = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5]], dtype=np.float32)
    state = {"ee0.state.argmax": np.array([[0], [0], [2]], dtype=np.int64),
             "ee0.state.count": np.array([2, 3, 1], dtype=np.float32)}
    out = _run_gate(GateKind.PATIENCE, x, 3, opset, state=state, emit_patience=True)
    np.testing.assert_array_equal(out["ee1.score"], [3, 1, 2])
    np.testing.assert_array_equal(out["ee1.gate"], [True, False, False])
    np.testing.assert_array_equal(out["ee1.state.argmax"], [[0], [1], [2]])
    np.testing.assert_array_equal(out["ee1.state.count"], [3, 1, 2])
