"""Quantized (QDQ) graphs are cut so QuantizeLinear/DequantizeLinear groups stay whole: the 8-bit tensor a
QuantizeLinear produces is carried (a quarter of the float bytes) and the next segment dequantizes it;
``analyze`` shows the same carried tensor; the chain equals the quantized model exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.compiler import analyze_model

from .builders import dequantized, qdq_cnn
from .check import check_bundle


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qdq_cnn(tmp_path_factory.mktemp("qdq"))


def _feeds() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(9).standard_normal((9, 3, 32, 32)).astype(np.float32)}


def test_qdq_cut_carries_the_8bit_tensor(qdq_model: Path, tmp_path: Path) -> None:
    (q1, dq1), (q2, dq2) = dequantized(qdq_model, "pool1"), dequantized(qdq_model, "pool2")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": str(qdq_model), "final": {"output": "logits"}, "exits": [
        {"at": dq1, "head": {"output": "aux0"}, "gate": {"kind": "max_prob", "threshold": 0.9}},
        {"at": dq2, "head": {"output": "aux1"}, "gate": {"kind": "entropy", "threshold": 0.3}}]}))
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    segs = b.manifest.segments
    assert segs[0].carried_out == [q1] and segs[1].carried_out == [q2]
    carried = {t.name: t.dtype for s in segs for t in s.outputs}
    assert carried[q1] == "uint8" and carried[q2] == "uint8"
    assert any("verified" in n and "0.0e+00" in n for n in b.manifest.notes)  # QDQ groups fuse as in the model
    check_bundle(qdq_model, b.path, _feeds(), "logits", ["aux0", "aux1"], rtol=1e-6)


def test_analyze_shows_the_8bit_carry(qdq_model: Path) -> None:
    report = analyze_model(qdq_model)
    q1, dq1 = dequantized(qdq_model, "pool1")
    by_name = {c.tensor: c for c in report.cut_points}
    assert by_name[dq1].carried == [q1] and by_name[dq1].problem is None
    assert any(by_name[t].carried[0].endswith("QuantizeLinear_Output") for t in report.suggested)


def test_quantized_graph_tolerance_is_its_quantization_step(qdq_model: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from eecompile.passes.load import load_model
    from eecompile.passes.verify import graph_tolerance

    g = onnx.load(str(qdq_model)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    last_q = [n for n in g.node if n.op_type == "QuantizeLinear"][-1]
    tol = graph_tolerance(load_model(qdq_model), 2)
    assert tol.relative == 1e-5 and "quantized" in tol.precision
    assert tol.absolute == pytest.approx(float(np.abs(inits[last_q.input[1]]).max()))
