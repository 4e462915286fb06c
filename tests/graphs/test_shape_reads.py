"""Tensors read after a cut only by Shape nodes are not carried: ``Shape(r1)[0]`` (the batch size) is read
from the model input instead, so a cut after ``r1`` carries only what the next segment computes with, and
``analyze`` and ``compile`` agree on the cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.compiler import analyze_model

from .builders import shape_read_cnn
from .check import check_bundle


@pytest.mark.parametrize("merged", [False, True])
def test_shape_only_read_is_not_carried(merged: bool, tmp_path: Path) -> None:
    model = shape_read_cnn(tmp_path / "m.onnx", merged=merged)
    report = analyze_model(model)
    r2 = next(c for c in report.cut_points if c.tensor == "r2")
    assert r2.carried == ["r2"] and r2.problem is None
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": str(model), "final": {"output": "logits"}, "exits": [
        {"at": "r2", "head": {"output": "aux"}, "gate": {"kind": "max_prob", "threshold": 0.5}}]}))
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert b.manifest.segments[0].carried_out == ["r2"]
    feeds = {"x": np.random.default_rng(2).standard_normal((6, 3, 16, 16)).astype(np.float32)}
    check_bundle(model, b.path, feeds, "logits", ["aux"])
