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


def _time_major(path: Path) -> dict[str, np.ndarray]:
    """x [N, 4, 6] -> [T=6, N, 4] -> two MatMul+Relu layers -> y [T, N, 5], time-major like a CTC recogniser;
    ``aux`` (from the first layer) is an in-model head with y's shape."""
    rng = np.random.default_rng(0)
    w = {"w1": rng.standard_normal((4, 4)) * 2, "w2": rng.standard_normal((4, 4)), "w3": rng.standard_normal((4, 5)),
         "wa": rng.standard_normal((4, 5)) * 3}
    inits = ", ".join(f"float[{a}, {b}] {n} = {{{', '.join(f'{v:.4f}' for v in m.ravel())}}}"
                      for n, m in w.items() for a, b in [m.shape])
    onnx.save(onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 6] x) => (float[6, N, 5] y) <{inits}> {{
            xt = Transpose<perm = [2, 0, 1]>(x)
            h = MatMul(xt, w1)
            r = Relu(h)
            aux = MatMul(r, wa)
            h2 = MatMul(r, w2)
            r2 = Relu(h2)
            y = MatMul(r2, w3)
        }}"""), path)
    return {n: np.round(m, 4).astype(np.float32) for n, m in w.items()}


def test_time_major_output_keeps_its_batch_axis(tmp_path: Path) -> None:
    w = _time_major(tmp_path / "model.onnx")
    spec = {"model": "model.onnx", "exits": [{"at": "r", "head": {"output": "aux"},
                                               "gate": {"kind": "max_prob", "threshold": 0.5}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    bundle = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle")
    m = bundle.manifest
    assert [(t.shape, t.batch_axis) for t in m.outputs] == [([6, "batch", 5], 1)]
    exit_out = next(t for t in m.segments[0].outputs if t.name == "ee0.out.y")
    assert exit_out.batch_axis == 1 and [t.shape for t in m.segments[0].outputs if t.name == "ee0.gate"] == [["batch"]]
    x = np.random.default_rng(1).standard_normal((7, 4, 6)).astype(np.float32)
    runner = eecompile.load(bundle)
    want = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(runner.run({"x": x}, thresholds="never").outputs["y"], want, rtol=1e-5, atol=1e-5)
    aux = np.maximum(x.transpose(2, 0, 1) @ w["w1"], 0) @ w["wa"]
    np.testing.assert_allclose(runner.run({"x": x}, thresholds="always").outputs["y"], aux, rtol=1e-4, atol=1e-4)
    # The gate decides per sample (the least confident time step), with scores in [1/C, 1].
    probe = runner.run({"x": x}, thresholds=["never"], policy="never")
    assert probe.gate_scores is not None and probe.gate_scores.shape == (1, 7)
    p = np.exp(aux - aux.max(-1, keepdims=True))
    np.testing.assert_allclose(probe.gate_scores[0], (p / p.sum(-1, keepdims=True)).max(-1).min(0), rtol=1e-5)
    u = np.unique(probe.gate_scores[0])
    mixed = [float(u[-3:-1].mean())]  # between the distinct scores: the two most confident samples leave
    base = runner.run({"x": x}, thresholds=mixed, policy="never")
    assert base.all_exits is not None and int((base.exit_index == 0).sum()) == 2
    for policy in ("compact", "wait-all"):
        r = runner.run({"x": x}, thresholds=mixed, policy=policy)
        rows = np.stack([base.all_exits[int(e)]["y"][:, i] for i, e in enumerate(r.exit_index)], axis=1)
        np.testing.assert_allclose(r.outputs["y"], rows, rtol=1e-6, atol=1e-6)


# ---- time-major inputs: [T, B, F] (torch code without batch_first), the batch measured on axis 1


@pytest.fixture(scope="module", params=[False, True], ids=["last-step-output", "time-major-output"])
def time_major_input(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.graphs.builders import lstm_time_major_input

    ws = tmp_path_factory.mktemp("tm_input")
    lstm_time_major_input(ws / "model.onnx", time_major_output=request.param)
    spec = {"model": "model.onnx", "exits": [{"at": "r1", "head": {"output": "aux0"},
                                               "gate": {"kind": "max_prob", "threshold": 0.5}}],
            "final": {"output": "logits"}}
    (ws / "spec.yaml").write_text(yaml.safe_dump(spec))
    eecompile.compile_model(ws / "spec.yaml", ws / "b.eebundle")
    return ws, ws / "b.eebundle"


def _tm_feeds(n: int = 7, t: int = 9, seed: int = 5) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((t, n, 6)).astype(np.float32)}


def test_time_major_input_has_its_batch_axis_measured(time_major_input: tuple[Path, Path]) -> None:
    _, bundle = time_major_input
    m = eecompile.Bundle.load(bundle).manifest
    assert m.batch_mode == "dynamic"
    assert [(t.name, t.shape, t.batch_axis) for t in m.inputs] == [("x", ["time", "batch", 6], 1)]
    assert any("batch axis measured (x on axis 1)" in n for n in m.notes), m.notes
    seg0 = {t.name: t.batch_axis for t in m.segments[0].inputs}
    assert seg0 == {"x": 1}
    carried = next(t for t in m.segments[0].outputs if t.name == "r1")
    assert (carried.shape, carried.batch_axis) == (["time", "batch", 24], 1)


def test_time_major_input_compact_wait_all_never_agree(time_major_input: tuple[Path, Path]) -> None:
    from tests.graphs.check import check_bundle

    ws, bundle = time_major_input
    check_bundle(ws / "model.onnx", bundle, _tm_feeds(), "logits", ["aux0"])
    # A time length other than the one probed, and samples one at a time, give the same rows.
    feeds = _tm_feeds(n=5, t=13, seed=8)
    ref = ort.InferenceSession(str(ws / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    runner = eecompile.load(bundle)
    got = runner.run(feeds, thresholds="never").outputs["logits"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    ax = runner.manifest.outputs[0].batch_axis or 0
    for i in range(5):
        one = runner.run({"x": feeds["x"][:, i:i + 1]}, thresholds="never").outputs["logits"]
        np.testing.assert_allclose(one, np.take(ref, [i], axis=ax), rtol=1e-5, atol=1e-5)


def test_time_major_input_runs_from_an_npz(time_major_input: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from eecompile.cli import cli

    ws, bundle = time_major_input
    feeds = _tm_feeds(n=10)
    np.savez(tmp_path / "in.npz", **feeds)
    ref = ort.InferenceSession(str(ws / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    runner = eecompile.load(bundle)
    probe = runner.run(feeds, thresholds=["never"], policy="never")
    assert probe.gate_scores is not None and probe.all_exits is not None
    mixed = float(np.median(probe.gate_scores[0]))
    ax = runner.manifest.outputs[0].batch_axis or 0
    outs = {}
    for policy in ("compact", "wait-all", "never"):
        out = tmp_path / f"{policy}.npz"
        res = CliRunner().invoke(cli, ["run", str(bundle), "--data", str(tmp_path / "in.npz"), "-o", str(out),
                                       "--batch", "4", "--policy", policy, "--thresholds", f"{mixed}"])
        assert res.exit_code == 0, res.output
        outs[policy] = dict(np.load(out))
    e = outs["compact"]["exit_index"]
    assert e.shape == (10,) and 0 < int((e == 0).sum()) < 10
    for policy in ("wait-all", "never"):
        np.testing.assert_array_equal(outs[policy]["exit_index"], e)
        np.testing.assert_allclose(outs[policy]["logits"], outs["compact"]["logits"], rtol=1e-6, atol=1e-6)
    # each sample's row is the model's output (final exit) or its in-model head's (exit 0), along the batch axis
    want = np.stack([np.take(ref[1] if k == 0 else ref[0], i, axis=ax) for i, k in enumerate(e)], axis=ax)
    np.testing.assert_allclose(outs["compact"]["logits"], want, rtol=1e-4, atol=1e-5)
    never = CliRunner().invoke(cli, ["run", str(bundle), "--data", str(tmp_path / "in.npz"), "-o",
                                     str(tmp_path / "n.npz"), "--batch", "3", "--thresholds", "never"])
    assert never.exit_code == 0, never.output
    np.testing.assert_allclose(np.load(tmp_path / "n.npz")["logits"], ref[0], rtol=1e-5, atol=1e-5)


def test_time_major_input_trains_and_calibrates(tmp_path: Path) -> None:
    """train-heads collects features and calibrate collects gate scores along the input's batch axis."""
    from eecompile.calibrate import calibrate_bundle
    from eecompile.train import train_heads
    from tests.graphs.builders import lstm_time_major_input

    lstm_time_major_input(tmp_path / "model.onnx")
    spec = {"model": "model.onnx", "exits": [{"at": "r1", "head": {"kind": "linear", "options": {"pool": "mean"}},
                                               "gate": {"kind": "max_prob", "threshold": 0.9}}],
            "final": {"output": "logits", "drop": ["aux0"]}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    bundle = tmp_path / "b.eebundle"
    eecompile.compile_model(tmp_path / "spec.yaml", bundle)
    train = _tm_feeds(n=120, seed=1)
    np.savez(tmp_path / "train.npz", **train)
    report = train_heads(bundle, tmp_path / "train.npz", epochs=40, quiet=True)
    assert report.n_train + report.n_val == 120
    head = report.heads[0]
    assert head.agree_after > head.agree_before and head.agree_after >= 0.5, head
    np.savez(tmp_path / "cal.npz", **_tm_feeds(n=60, seed=2))
    rep = calibrate_bundle(bundle, tmp_path / "cal.npz", max_drop=0.5, confidence=0.6, repeats=3, quiet=True)
    assert rep.n_samples == 60
    # the trained head's rows are what the chain returns for a forced exit, per sample along axis 0 of [B, 5]
    feeds = _tm_feeds(n=6, seed=3)
    runner = eecompile.load(bundle)
    forced = runner.run(feeds, thresholds="always").outputs["logits"]
    for i in range(6):
        one = runner.run({"x": feeds["x"][:, i:i + 1]}, thresholds="always").outputs["logits"]
        np.testing.assert_allclose(one, forced[i:i + 1], rtol=1e-5, atol=1e-6)


def _model(text: str, path: Path) -> Path:
    onnx.save(onnx.parser.parse_model(text), path)
    return path


def test_batch_symbol_is_the_axis_whose_samples_never_mix(tmp_path: Path) -> None:
    """Measured, not read off the names: a cumulative sum over axis 0 mixes along 'N' (axis 0), so the batch
    is 'steps' (axis 1) even though 'N' sits on axis 0; a model that mixes along neither is refused."""
    from eecompile.analysis.probe import measure_batch_symbol
    from eecompile.errors import GraphError
    from eecompile.passes.load import load_model

    head = '<ir_version: 8, opset_import: ["" : 14]>\n'
    p = _model(head + """g (float[N, steps, 4] x) => (float[N, steps, 4] y) <int64 zero = {0}> {
        y = CumSum(x, zero)
    }""", tmp_path / "cumsum.onnx")
    sym = measure_batch_symbol(load_model(p))
    assert sym is not None and (sym.symbol, sym.axes) == ("steps", {"x": 1}) and "N" in sym.rejected
    both = _model(head + """g (float[T, batch, 4] x) => (float[T, batch, 4] y) { y = Relu(x) }""",
                  tmp_path / "relu.onnx")
    sym = measure_batch_symbol(load_model(both))  # samples independent along both: the batch-like name
    assert sym is not None and (sym.symbol, sym.axes, sym.rejected) == ("batch", {"x": 1}, {})
    mix = _model(head + """g (float[T, N, 4] x) => (float[T, N, 4] y) {
        m = ReduceMean<keepdims = 1>(x)
        y = Sub(x, m)
    }""", tmp_path / "mix.onnx")
    with pytest.raises(GraphError, match="no symbolic input dim keeps samples independent"):
        measure_batch_symbol(load_model(mix))


def test_a_lone_symbolic_dim_is_measured_too(tmp_path: Path) -> None:
    """A ``[T, F]`` sequence model (no batch at all): its only symbolic dim is time, along which a cumulative
    sum mixes steps; it used to be taken as the batch (rows compacted along time). Compile refuses it, naming
    the dim and why; a lone dim along which samples never mix is still the batch."""
    from eecompile.errors import GraphError

    head = '<ir_version: 8, opset_import: ["" : 14]>\n'
    seq = _model(head + """g (float[T, 4] x) => (float[T, 4] y, float[T, 4] aux) <int64 zero = {0}> {
        h = Relu(x)
        aux = Neg(h)
        y = CumSum(h, zero)
    }""", tmp_path / "seq.onnx")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"model": str(seq), "final": {"output": "y"}, "exits": [
        {"at": "h", "head": {"output": "aux"}, "gate": {"kind": "max_prob", "threshold": 0.5}}]}))
    with pytest.raises(GraphError, match=r"no symbolic input dim keeps samples independent \('T': .*samples mix"):
        eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle")
    assert not (tmp_path / "b.eebundle").exists()
    from eecompile.analysis.probe import measure_batch_symbol
    from eecompile.passes.load import load_model

    rows = _model(head + """g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }""", tmp_path / "rows.onnx")
    sym = measure_batch_symbol(load_model(rows))
    assert sym is not None and (sym.symbol, sym.axes, sym.rejected) == ("N", {"x": 0}, {})


@pytest.mark.parametrize("time_major_output", [False, True], ids=["last-step-output", "time-major-output"])
def test_time_major_input_exported_at_batch_1_runs_per_sample(tmp_path: Path, time_major_output: bool) -> None:
    """A static ``[T=9, 1, 6]`` export (no dynamic axes): one sample at a time, fed along axis 1 (the axis of
    size 1), not axis 0; rows agree across policies with the model run on each sample. With a time-major output
    (``[9, 1, 5]``) the batch of one is axis 1 of the output too, so the exit's gate gives one bool per sample
    (it used to reduce over time, give shape [9], and verify called it a bug in the split)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(3)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn1, self.rnn2 = nn.LSTM(6, 12), nn.LSTM(12, 12)
            self.out, self.aux = nn.Linear(12, 5), nn.Linear(12, 5)

        def forward(self, x):  # noqa: ANN001, ANN202
            r1, _ = self.rnn1(x)
            r2, _ = self.rnn2(torch.relu(r1))
            if time_major_output:
                return self.out(r2) * 4.0, self.aux(r1) * 4.0
            return self.out(r2[-1]) * 4.0, self.aux(r1[-1]) * 4.0

    torch.onnx.export(M().eval(), (torch.randn(9, 1, 6),), str(tmp_path / "model.onnx"), input_names=["x"],
                      output_names=["logits", "aux0"], opset_version=14, dynamo=False)
    relu = next(n.output[0] for n in onnx.load(str(tmp_path / "model.onnx")).graph.node if n.op_type == "Relu")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "model": "model.onnx", "final": {"output": "logits"},
        "exits": [{"at": relu, "head": {"output": "aux0"}, "gate": {"kind": "max_prob", "threshold": 0.5}}]}))
    b = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle")
    assert b.manifest.batch_mode == "per_sample"
    assert [(t.shape, t.batch_axis) for t in b.manifest.inputs] == [([9, 1, 6], 1)]
    row_axis = 1 if time_major_output else 0
    assert [(t.shape, t.batch_axis) for t in b.manifest.outputs] == [([9, 1, 5] if time_major_output else [1, 5],
                                                                      row_axis)]
    x = _tm_feeds(n=6)["x"]
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ref, aux = (np.concatenate(p, axis=row_axis)
                for p in zip(*[sess.run(None, {"x": x[:, i:i + 1]}) for i in range(6)], strict=True))
    runner = eecompile.load(b.path)
    probe = runner.run({"x": x}, thresholds=["never"], policy="never")
    assert probe.gate_scores is not None and probe.gate_scores[0].shape == (6,)
    mixed = [float(np.median(probe.gate_scores[0]))]
    for policy in ("compact", "wait-all", "never"):
        r = runner.run({"x": x}, thresholds=mixed, policy=policy)
        assert 0 < int((r.exit_index == 0).sum()) < 6
        left = r.exit_index == 0
        want = np.where(left[None, :, None] if time_major_output else left[:, None], aux, ref)
        np.testing.assert_allclose(r.outputs["logits"], want, rtol=1e-5, atol=1e-6)


def test_trained_token_head_for_a_time_major_output(tmp_path: Path) -> None:
    """A head eecompile makes reads and gives batch-first tensors ([B, T, C]); for a time-major final output
    ([T, B, C]) the exit moves the batch back to axis 1, before and after train-heads, so each sample's rows are
    its own (before the fix the gate reduced over the time axis and verify refused the bundle)."""
    from eecompile.train import train_heads
    from tests.graphs.builders import lstm_time_major_input

    lstm_time_major_input(tmp_path / "model.onnx", time_major_output=True)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "model": "model.onnx", "final": {"output": "logits", "drop": ["aux0"]},
        "exits": [{"at": "r1", "head": {"kind": "token"}, "gate": {"kind": "max_prob", "threshold": 0.9}}]}))
    b = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle")
    out = next(t for t in b.manifest.segments[0].outputs if t.name == "ee0.out.logits")
    assert (out.shape, out.batch_axis) == (["time", "batch", 5], 1)
    np.savez(tmp_path / "train.npz", **_tm_feeds(n=120, seed=1))
    report = train_heads(b.path, tmp_path / "train.npz", epochs=30, quiet=True)
    assert report.heads[0].train_agree > report.heads[0].agree_before
    x = _tm_feeds(n=6, seed=3)["x"]
    runner = eecompile.load(b.path)
    forced = runner.run({"x": x}, thresholds="always").outputs["logits"]
    assert forced.shape == (9, 6, 5)
    for i in range(6):
        one = runner.run({"x": x[:, i:i + 1]}, thresholds="always").outputs["logits"]
        np.testing.assert_allclose(one, forced[:, i:i + 1], rtol=1e-5, atol=1e-6)
    steps = x[..., :5].cumsum(0).argmax(-1)  # the rule the model was trained on; the head learnt it too
    assert float((forced.argmax(-1) == steps).mean()) > 0.5
