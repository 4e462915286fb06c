"""Model inputs without a batch axis (issue kind: a ``bool[1]`` flag, a ``[1, T]`` table beside a batched
input): the bundle stays batch-dynamic, the manifest says they have no batch axis, and they are fed as given
to every segment that reads them, never sliced or gathered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

import eecompile
from tests.bad_inputs.util import linear_head

FLAGGED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, bool[1] flag, float[1, 4] table) => (float[N, 3] y)
<float[4, 4] w1 = {1, 0, 2, 0, 0, 1, 0, -1, 1, 1, 0, 0, 0, 2, 1, 1},
 float[4, 3] w2 = {1, 0, 1, 0, 1, 1, 1, 1, 0, -1, 0, 2}> {
    a = MatMul(x, w1)
    t = Add(a, table)
    n = Neg(t)
    h = Where(flag, t, n)
    r = Relu(h)
    y = MatMul(r, w2)
}
"""


@pytest.fixture(scope="module")
def flagged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ws = tmp_path_factory.mktemp("flagged")
    onnx.save(onnx.parser.parse_model(FLAGGED), ws / "model.onnx")
    linear_head(ws / "head.onnx", width=4, classes=3, seed=4)
    spec = {"model": "model.onnx", "exits": [{"at": "r", "head": "head.onnx",
                                               "gate": {"kind": "max_prob", "threshold": 0.5}}]}
    (ws / "spec.yaml").write_text(yaml.safe_dump(spec))
    eecompile.compile_model(ws / "spec.yaml", ws / "b.eebundle")
    return ws, ws / "b.eebundle"


def _feeds(flag: bool, n: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"x": rng.standard_normal((n, 4)).astype(np.float32), "flag": np.array([flag]),
            "table": rng.standard_normal((1, 4)).astype(np.float32)}


def test_unbatched_inputs_keep_the_bundle_batch_dynamic(flagged: tuple[Path, Path]) -> None:
    _, bundle = flagged
    m = eecompile.Bundle.load(bundle).manifest
    assert m.batch_mode == "dynamic"
    axes = {t.name: t.batch_axis for t in m.inputs}
    assert axes == {"x": 0, "flag": None, "table": None}
    assert any("fed as given: flag, table" in n for n in m.notes), m.notes
    seg0 = {t.name: t.batch_axis for t in m.segments[0].inputs}
    assert seg0 == {"x": 0, "flag": None, "table": None}
    assert [t.shape for t in m.segments[0].inputs if t.name != "x"] == [[1], [1, 4]]


@pytest.mark.parametrize("flag", [True, False])
def test_flag_given_once_runs_every_policy(flagged: tuple[Path, Path], flag: bool) -> None:
    ws, bundle = flagged
    feeds = _feeds(flag)
    want = ort.InferenceSession(str(ws / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    runner = eecompile.load(bundle)
    got = runner.run(feeds, thresholds="never")
    np.testing.assert_allclose(got.outputs["y"], want, rtol=1e-5, atol=1e-6)
    allx = runner.run(feeds, thresholds=["never"], policy="never")
    assert allx.gate_scores is not None and allx.all_exits is not None
    mixed = [float(np.median(allx.gate_scores[0]))]
    base = runner.run(feeds, thresholds=mixed, policy="never")
    assert 0 < int((base.exit_index == 0).sum()) < len(feeds["x"])
    for policy in ("compact", "wait-all"):
        r = runner.run(feeds, thresholds=mixed, policy=policy)
        np.testing.assert_array_equal(r.exit_index, base.exit_index)
        rows = np.stack([base.all_exits[int(e)]["y"][i] for i, e in enumerate(r.exit_index)])
        np.testing.assert_allclose(r.outputs["y"], rows, rtol=1e-6, atol=1e-7)


def test_npz_with_the_flag_given_once_runs_from_the_cli(flagged: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from eecompile.cli import cli

    ws, bundle = flagged
    feeds = _feeds(True, n=9)
    np.savez(tmp_path / "in.npz", **feeds)
    res = CliRunner().invoke(cli, ["run", str(bundle), "--data", str(tmp_path / "in.npz"), "-o",
                                   str(tmp_path / "out.npz"), "--batch", "4", "--thresholds", "never"])
    assert res.exit_code == 0, res.output
    want = ort.InferenceSession(str(ws / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["y"], want, rtol=1e-5, atol=1e-6)
