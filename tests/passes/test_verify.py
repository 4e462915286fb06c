"""Verification: a split whose chain differs from the unsplit model is refused and nothing is written; a
correct one is recorded with its worst relative error."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import eecompile.write
from eecompile.compiler import compile_model
from eecompile.errors import GraphError
from tests.bad_inputs.util import make_workspace


def test_correct_split_is_verified(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    notes = compile_model(ws / "spec.yaml", tmp_path / "b.eebundle").manifest.notes
    (note,) = [n for n in notes if n.startswith("verified")]
    worst = re.search(r"max rel\. error ([0-9.e+-]+)", note)
    assert worst is not None and float(worst.group(1)) < 1e-5, note


def test_chain_that_differs_from_the_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = make_workspace(tmp_path / "ws", compile_bundle=False)
    real_save = eecompile.write.save_segment

    def tampered(model: ir.Model, path: Path, *args: object) -> None:
        if path.name == "seg2.onnx":  # the last segment: scale one weight of the final layer
            w = model.graph.initializers["Wo"]
            w.const_value = ir.tensor(w.const_value.numpy() * np.float32(1.01), name="Wo")
        real_save(model, path, *args)

    monkeypatch.setattr(eecompile.write, "save_segment", tampered)
    with pytest.raises(GraphError, match=r"verify: with no exit taken, the chain's 'logits' differs from the "
                                         r"unsplit model by .* nothing was written"):
        compile_model(ws / "spec.yaml", tmp_path / "b.eebundle")
    assert not (tmp_path / "b.eebundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "ws"], "the staging directory was left behind"


def test_gate_that_is_not_one_bool_per_sample_is_refused(tmp_path: Path) -> None:
    # A chain that equals the model but whose gate reduces over the batch axis: [T] bools instead of [B].
    import onnx

    from eecompile.passes.verify import Reference, SegmentIO, verify_chain

    seg0 = ir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 17]>
s0 (float[T, N, 2] x, float thr) => (float[T, N, 2] h, bool[T] gate) {
    h = Relu(x)
    s = ReduceMax <axes = [1, 2], keepdims = 0> (h)
    gate = Greater(s, thr)
}
""")
    seg1 = ir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 17]>
s1 (float[T, N, 2] h) => (float[T, N, 2] y) {
    y = Neg(h)
}
""")
    files = []
    for i, m in enumerate((seg0, seg1)):
        files.append(tmp_path / f"seg{i}.onnx")
        onnx.save(ir.to_proto(m), files[-1])
    segs = [SegmentIO(files[0], ["x"], "thr", ["h", "gate"], "gate"),
            SegmentIO(files[1], ["h"], None, ["y"])]
    x = np.random.default_rng(0).standard_normal((5, 3, 2)).astype(np.float32)  # T=5, batch 3
    ref = Reference([(3, {"x": x})], [{"y": -np.maximum(x, 0)}])
    with pytest.raises(GraphError, match=r"segment 0's gate 'gate' has shape \[5\] for a batch of 3, "
                                         r"expected \[3\] \(one bool per sample\)"):
        verify_chain(ref, segs, ["y"])
    segs[0].gate_output = None  # without the gate check the same chain verifies: the final outputs agree
    assert verify_chain(ref, segs, ["y"]) == 0.0
