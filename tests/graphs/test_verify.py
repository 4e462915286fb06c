"""Verify compares what it should: its tolerance follows the precision the graph computes in (float16 graphs
with float32 edges differ between segments and the whole model by less than one fp16 rounding step), a
failing verify names the boundary where the difference starts, the observed and allowed error, and says
whether it looks like numeric noise or a broken split; ``--tolerance`` overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner

import eecompile
from eecompile.cli import cli
from eecompile.compiler import prepare
from eecompile.errors import GraphError
from eecompile.passes.load import load_model
from eecompile.passes.verify import SegmentIO, graph_tolerance, reference_outputs, verify_chain

from .builders import fp16_cnn, small_cnn
from .check import check_bundle


def _spec(tmp: Path, model: Path) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(yaml.safe_dump({"model": str(model), "final": {"output": "probs"}, "exits": [
        {"at": "pool", "head": {"output": "aux"}, "gate": {"kind": "max_prob", "threshold": 0.5}}]}))
    return p


def _feeds() -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(4).standard_normal((8, 3, 32, 32)).astype(np.float32)}


def test_fp16_graph_with_fp32_edges_verifies_against_its_precision(tmp_path: Path) -> None:
    model = fp16_cnn(tmp_path / "m.onnx")
    b = eecompile.compile_model(_spec(tmp_path, model), tmp_path / "b.eebundle")
    note = next(n for n in b.manifest.notes if n.startswith("verified"))
    assert "float16 compute" in note
    check_bundle(model, b.path, _feeds(), "probs", ["aux"], rtol=2e-3)


def test_too_tight_tolerance_is_reported_as_numeric_noise(tmp_path: Path) -> None:
    model = fp16_cnn(tmp_path / "m.onnx")
    with pytest.raises(GraphError) as err:
        eecompile.compile_model(_spec(tmp_path, model), tmp_path / "b.eebundle", tolerance=1e-7)
    msg = str(err.value)
    assert "allowed 1.0e-07 of the scale, given by --tolerance" in msg
    assert "numeric noise (the argmax agrees" in msg and "--tolerance 1e-03" in msg
    assert "bug in the split" not in msg
    assert not (tmp_path / "b.eebundle").exists()
    # the CLI option: the same model passes with an explicit tolerance
    res = CliRunner().invoke(cli, ["compile", str(_spec(tmp_path, model)), "-o", str(tmp_path / "c.eebundle"),
                                   "--tolerance", "1e-2"])
    assert res.exit_code == 0, res.output
    assert "given by --tolerance" in res.output


def test_broken_split_names_the_boundary(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "m.onnx", activation=None)
    b = eecompile.compile_model(_spec(tmp_path, model), tmp_path / "b.eebundle")
    assert graph_tolerance(load_model(model), 1).relative == 1e-5
    # Damage segment 0 the way a wrong split would: a weight before the cut changes.
    seg0 = b.path / "segments" / "seg0.onnx"
    m = onnx.load(str(seg0))
    w = next(t for t in m.graph.initializer if t.name == "c1.w")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0] += 1.0
    w.CopyFrom(onnx.numpy_helper.from_array(arr, "c1.w"))
    onnx.save(m, seg0)
    src = prepare(model).model  # typed values, as the compiler has them
    ref = reference_outputs(src, [4], per_sample=False, carried=["pool"], tolerance=graph_tolerance(src, 1))
    ios = [SegmentIO(b.path / s.file, [t.name for t in s.inputs], s.exit.gate.threshold_input if s.exit.gate else None,
                     [t.name for t in s.outputs]) for s in b.manifest.segments]
    with pytest.raises(GraphError) as err:
        verify_chain(ref, ios, ["probs"])
    msg = str(err.value)
    assert "starts at boundary 0 (carried 'pool' differs by" in msg
    assert "allowed 1.0e-05 of the scale, float32" in msg
    assert "the argmax differs on" in msg and "bug in the split" in msg
