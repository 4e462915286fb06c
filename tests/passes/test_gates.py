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
              state: dict[str, np.ndarray] | None = None, emit_patience: bool = False,
              probs: np.ndarray | None = None, only_probs: bool = False, ops: list[str] | None = None,
              ) -> dict[str, np.ndarray]:
    """Run exit 1's gate on ``logits`` with ONNX Runtime. ``probs``: the graph's own softmax of them, fed as a
    second input; ``only_probs``: ``logits`` are probabilities (the gate's input is its own probs). ``ops``
    collects the op types of the gate's nodes."""
    shape = ["batch", *logits.shape[1:]]
    x = ir.Value(name="logits", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
    p = ir.Value(name="probs", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
    given = x if only_probs else p if probs is not None else None
    tape = Tape()
    res = build_gate(tape, 1, kind, x, shape, class_axis, opset, prev_k=0 if state else None,
                     emit_patience_state=emit_patience, probs=given)
    outs = [res.gate, res.score, *res.state_outputs]
    for v in outs:
        if v.dtype is None:
            v.dtype = ir.DataType.BOOL if v.name.endswith("gate") else (
                ir.DataType.INT64 if v.name.endswith("argmax") else ir.DataType.FLOAT)
    inputs = [x, *([p] if given is p else []), *res.state_inputs, res.threshold]
    g = ir.Graph(inputs, outs, nodes=tape.nodes, opset_imports={"": opset})
    if ops is not None:
        ops.extend(n.op_type for n in g)
    model = ir.Model(g, ir_version=8)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"logits": logits.astype(np.float32), "ee1.threshold": np.array(threshold, np.float32)}
    if given is p:
        feeds["probs"] = np.asarray(probs, np.float32)
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


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("shape", [(16, 5), (4, 6, 5)], ids=["classes", "tokens"])
def test_max_prob_reads_the_exits_own_softmax(opset: int, shape: tuple[int, ...]) -> None:
    """Given the softmax the segment already computes (the exit output of a model ending in a Softmax), max_prob
    takes its max instead of a second Softmax: the same scores, one Softmax fewer."""
    x = np.random.default_rng(5).standard_normal(shape) * 3
    before: list[str] = []
    after: list[str] = []
    own = _run_gate(GateKind.MAX_PROB, x, 0.5, opset, ops=before)
    reused = _run_gate(GateKind.MAX_PROB, x, 0.5, opset, probs=_softmax(x), ops=after)
    np.testing.assert_allclose(reused["ee1.score"], own["ee1.score"], rtol=1e-6)
    np.testing.assert_allclose(reused["ee1.score"], _softmax(x).max(-1).reshape(shape[0], -1).min(-1), rtol=1e-6)
    np.testing.assert_array_equal(reused["ee1.gate"], own["ee1.gate"])
    assert before.count("Softmax") == 1 and "Softmax" not in after and len(after) < len(before)
    # the guard still reads the logits: a -inf logit (a finite softmax) never fires
    bad = np.array([[-np.inf, 5, 0], [10, 0, 0]], dtype=np.float32)
    out = _run_gate(GateKind.MAX_PROB, bad, 0.0, opset, probs=np.nan_to_num(_softmax(bad)))
    np.testing.assert_array_equal(out["ee1.gate"], [False, True])


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("kind", [GateKind.MAX_PROB, GateKind.MARGIN, GateKind.ENTROPY])
def test_a_head_that_gives_probabilities_is_not_softmaxed_again(kind: GateKind, opset: int) -> None:
    """An in-model head ending in a Softmax gives the gate probabilities: their softmax would squeeze every
    score towards uniform (max_prob 0.11 for a row whose top probability is 0.2)."""
    p = _softmax(np.random.default_rng(6).standard_normal((16, 6)) * 2)
    p[0] = [1, 0, 0, 0, 0, 0]  # a zero probability: p log p is 0 there, not NaN
    ops: list[str] = []
    out = _run_gate(kind, p, 0.5, opset, only_probs=True, ops=ops)
    top = np.sort(p, -1)
    want = {GateKind.MAX_PROB: top[:, -1], GateKind.MARGIN: top[:, -1] - top[:, -2],
            GateKind.ENTROPY: -(p * np.log(np.maximum(p, 1e-30))).sum(-1) / np.log(6)}[kind]
    np.testing.assert_allclose(out["ee1.score"], want, rtol=1e-5, atol=1e-6)
    assert "Softmax" not in ops and "LogSoftmax" not in ops
    nan = p.copy()
    nan[1, 2] = np.nan
    assert not _run_gate(kind, nan, 0.0 if kind.fires_above else 1.0, opset, only_probs=True)["ee1.gate"][1]
