"""MuE's encoder–decoder exits: encoder exits whose head (the encoder's final LayerNorm on an early layer) stands in
for the encoder output and *jump* to the decoder, which may let the sample leave early too."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.errors import BundleError, SpecError
from eecompile.runtimes.jumps import JumpRunner
from tests.loops.models import SEQ, VOCAB, export_encoder_decoder


def mue_spec(d: Path, model: Path, names: dict, name: str = "spec.yaml", **first: object) -> Path:
    doc = {"model": str(model), "exits": [
        {"at": names["enc1"], "head": {"output": "enc1"}, "jump": names["norm"],
         "gate": {"kind": "saturation", "threshold": 0.9, "against": names["emb"]}, **first},
        {"at": names["enc2"], "head": {"output": "enc2"}, "jump": names["norm"],
         "gate": {"kind": "saturation", "threshold": 0.9}},
        {"at": names["dec1"], "head": {"output": "logits1"}, "gate": {"kind": "max_prob", "threshold": 0.5}},
    ], "final": {"output": "logits"}}
    path = d / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def mue(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("mue")
    model, torch_model, names = export_encoder_decoder(d / "encdec.onnx")
    bundle = eecompile.compile_model(mue_spec(d, model, names), d / "mue.eebundle")
    feeds = _feeds(16, seed=0)
    return {"dir": d, "model": model, "torch": torch_model, "names": names, "bundle": bundle, "feeds": feeds,
            "runner": JumpRunner(bundle)}


def _mixed(runner: JumpRunner, feeds: dict) -> list[float]:
    """Thresholds from the gates' own scores (every gate on every row: jumps overridden to 'never' one by one)."""
    scores = []
    be = runner.backend
    env = dict(feeds)
    for seg, info in zip(runner._segs, runner.manifest.segments, strict=True):
        outs = be.run_segment(seg.index, {n: env[n] for n in seg.inputs},
                              np.inf if info.exit.gate is not None else None)
        env.update(outs)
        if info.exit.gate is not None:
            scores.append(float(np.quantile(outs[info.exit.gate.score_output], 0.6)))
    return scores


def _expected(mue: dict, res) -> np.ndarray:
    """Each sample's logits written out in torch from the path it took: the encoder output from the jump exit it
    left at (or the whole encoder), then the decoder up to the exit it left at."""
    import torch

    m, feeds = mue["torch"], mue["feeds"]
    with torch.no_grad():
        src, tgt = torch.from_numpy(feeds["src"]), torch.from_numpy(feeds["tgt"])
        _, h1, h2, enc_out = m.encode(src)
        memory = {-1: enc_out, 0: m.norm(h1), 1: m.norm(h2)}
        out = np.zeros((len(src), tgt.shape[1], VOCAB), np.float32)
        for b in range(len(src)):
            logits1, logits = m.decode(tgt[b:b + 1], memory[int(res.jumped[b])][b:b + 1])
            out[b] = (logits1 if res.exit_index[b] == 3 else logits)[0].numpy()
    return out


def test_jump_exits_feed_the_decoder(mue: dict) -> None:
    runner, feeds = mue["runner"], mue["feeds"]
    m = mue["bundle"].manifest
    assert m.jumps == [{"exit": 0, "tensor": mue["names"]["norm"], "to": 3},
                       {"exit": 1, "tensor": mue["names"]["norm"], "to": 3}]
    assert m.segments[2].exit.gate is None and m.segments[2].exit.outputs == {}  # the boundary at enc_out
    thr = _mixed(runner, feeds)
    res = runner.run(feeds, thresholds=thr)
    # Every path is taken: jumps from both encoder exits and none; decoder exit and final exit.
    assert set(res.jumped.tolist()) == {-1, 0, 1}, res.jumped
    assert set(res.exit_index.tolist()) == {3, 4}, res.exit_index
    np.testing.assert_allclose(res.outputs["logits"], _expected(mue, res), rtol=1e-4, atol=1e-4)
    # Compaction: the remaining encoder ran on fewer rows; the decoder on the merged batch.
    sizes = res.batch_sizes[0]
    assert sizes[0] == 16 and sizes[1] < 16 and sizes[2] < sizes[1] and sizes[3] == 16 and sizes[4] < 16
    never = runner.run(feeds, thresholds="never")
    assert (never.jumped == -1).all() and (never.exit_index == 4).all()
    np.testing.assert_allclose(never.outputs["logits"], _expected(mue, never), rtol=1e-4, atol=1e-4)


def test_compact_equals_wait_all_equals_one_sample_at_a_time(mue: dict) -> None:
    runner, feeds = mue["runner"], mue["feeds"]
    thr = _mixed(runner, feeds)
    compact = runner.run(feeds, thresholds=thr)
    for policy in ("wait-all", "never"):  # never: every sample also runs past the exit where it ends
        wait = runner.run(feeds, thresholds=thr, policy=policy)
        np.testing.assert_array_equal(wait.jumped, compact.jumped)
        np.testing.assert_array_equal(wait.exit_index, compact.exit_index)
        np.testing.assert_allclose(wait.outputs["logits"], compact.outputs["logits"], rtol=1e-5, atol=1e-6)
        assert wait.batch_sizes[0] == [16] * 5
    for b in range(len(feeds["src"])):
        one = runner.run({k: v[b:b + 1] for k, v in feeds.items()}, thresholds=thr)
        assert (one.jumped[0], one.exit_index[0]) == (compact.jumped[b], compact.exit_index[b])
        np.testing.assert_allclose(one.outputs["logits"][0], compact.outputs["logits"][b], rtol=1e-4, atol=1e-5)
    # Chunks (an engine's max batch): the same rows, in input order.
    runner.backend.max_batch = 5
    try:
        chunked = runner.run(feeds, thresholds=thr)
    finally:
        runner.backend.max_batch = None
    assert len(chunked.batch_sizes) == 4 and chunked.batch_sizes[0][0] == 5
    np.testing.assert_array_equal(chunked.jumped, compact.jumped)
    np.testing.assert_allclose(chunked.outputs["logits"], compact.outputs["logits"], rtol=1e-4, atol=1e-5)
    # Forced: every sample jumps at the first exit, then runs the whole decoder.
    forced = runner.run(feeds, thresholds=["always", "never", "never"])
    assert (forced.jumped == 0).all() and (forced.exit_index == 4).all()
    np.testing.assert_allclose(forced.outputs["logits"], _expected(mue, forced), rtol=1e-4, atol=1e-4)


def test_load_and_run_cli_use_the_jump_runner(mue: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from eecompile.cli import cli
    from eecompile.inspect import describe_bundle
    from eecompile.runtimes.chain import EarlyExitRunner

    assert isinstance(eecompile.load(mue["bundle"].path), JumpRunner)
    d = describe_bundle(mue["bundle"].path)
    assert [s["exit"]["jump"]["to"] if s["exit"]["jump"] else None for s in d["segments"]] == [3, 3, None, None, None]
    assert [s["exit"]["final"] for s in d["segments"]] == [False] * 4 + [True]
    with pytest.raises(BundleError, match=r"a bundle with jump exits .*run it with eecompile\.load"):
        EarlyExitRunner(mue["bundle"])
    np.savez(tmp_path / "in.npz", **mue["feeds"])
    r = CliRunner().invoke(cli, ["run", str(mue["bundle"].path), "--data", str(tmp_path / "in.npz"), "-o",
                                 str(tmp_path / "out.npz"), "--thresholds", "always,never,never"])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "out.npz")["logits"].shape == (16, 6, VOCAB)
    # Which samples jumped is in the file and the summary (they end at the decoder, so exit 0 ends none); the
    # jump exits and the jump target are not listed as exits a sample can end at.
    assert np.load(tmp_path / "out.npz")["jumped"].tolist() == [0] * 16
    assert "exit 3 0.0%, final 100.0%; jumped at exit 0 100.0%, exit 1 0.0%" in r.output, r.output


def test_a_jump_to_an_earlier_segment_is_refused(mue: dict, tmp_path: Path) -> None:
    names = mue["names"]
    spec = mue_spec(tmp_path, mue["model"], names)
    doc = yaml.safe_load(spec.read_text())
    doc["exits"][1]["jump"] = names["enc1"]  # exit 1 (after encoder layer 2) back to encoder layer 1's output
    spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"exits\[1\]\.jump: '/enc1/norm2/LayerNormalization_output_0' is computed "
                                        r"before exits\[1\]\.at .*a jump goes forward only"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
    doc["exits"][1]["jump"] = names["enc2"]  # its own cut: not a later segment either
    spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"exits\[1\]\.jump: .* a jump goes forward only"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert not (tmp_path / "b.eebundle").exists()


@pytest.mark.parametrize(("edit", "message"), [
    ({"to": 0}, r"jumps\[0\]\.to: segment 0 is not after exit 0: a jump goes to a later segment"),
    ({"to": 4}, r"jumps\[0\]\.to: segment 4 does not start at a boundary"),
    ({"tensor": "nowhere"}, r"jumps\[0\]\.to: segment 3 does not start at a boundary handing on 'nowhere'"),
])
def test_a_manifest_with_a_bad_jump_is_refused_on_load(mue: dict, tmp_path: Path, edit: dict, message: str) -> None:
    b = tmp_path / "b.eebundle"
    shutil.copytree(mue["bundle"].path, b)
    doc = yaml.safe_load((b / "manifest.yaml").read_text())
    doc["jumps"][0].update(edit)
    (b / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(BundleError, match=message):
        eecompile.load(b)


def test_jump_exit_gates_and_heads_are_checked(mue: dict, tmp_path: Path) -> None:
    names = mue["names"]
    spec = mue_spec(tmp_path, mue["model"], names, gate={"kind": "max_prob", "threshold": 0.5})
    with pytest.raises(SpecError, match=r"exits\[0\]\.gate\.kind .*a jump exit's head gives .* use saturation or score"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
    spec = mue_spec(tmp_path, mue["model"], names, head={"output": "logits1"})
    doc = yaml.safe_load(spec.read_text())
    doc["final"]["drop"] = ["enc1"]
    spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"exits\[0\]\.head\.output: 'logits1' has shape .* the head must give the "
                                        r"tensor it stands in for"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")


def test_loop_and_jump_bundles_run_where_the_compiler_cannot_be_imported(mue: dict, tmp_path: Path) -> None:
    """eecompile-device run in an interpreter that refuses onnx, onnx_ir, torch, click, rich and the compiler."""
    from tests.runtimes.test_fence import DEVICE, _python

    np.savez(tmp_path / "in.npz", **mue["feeds"])
    r = _python(DEVICE, "run", mue["bundle"].path, "--data", tmp_path / "in.npz", "-o", tmp_path / "out.npz",
                "--thresholds", "always,never,never", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "out.npz")["logits"].shape == (16, 6, VOCAB)
    import onnx

    onnx.save(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        halve (float[N, 4] x) => (float[N, 4] y) <float[4, 4] w = {0.5, 0, 0, 0, 0, 0.5, 0, 0, 0, 0, 0.5, 0, 0, 0, 0,
                                                                    0.5}, float[4] b = {1, 1, 1, 1}> {
            h = MatMul(x, w)
            y = Add(h, b)
        }"""), tmp_path / "halve.onnx")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"model": "halve.onnx", "loop": {
        "steps": 30, "feedback": {"y": "x"}, "gate": {"kind": "change", "of": "y", "threshold": 1e-3}}}))
    eecompile.compile_model(tmp_path / "s.yaml", tmp_path / "s.eebundle")
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 4), np.float32))
    r = _python(DEVICE, "run", tmp_path / "s.eebundle", "--data", tmp_path / "x.npz", "-o", tmp_path / "y.npz",
                "--steps", "4", "--loop-threshold", "never", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], 1.875)
    assert np.load(tmp_path / "y.npz")["steps"].tolist() == [4, 4, 4]


def _feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"src": rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64),
            "tgt": rng.integers(0, VOCAB, (n, 6)).astype(np.int64)}


def test_policy_never_records_every_exit_on_each_samples_path(mue: dict) -> None:
    from types import SimpleNamespace

    runner, feeds = mue["runner"], mue["feeds"]
    never = runner.run(feeds, thresholds=_mixed(runner, feeds), policy="never")
    # The decoder exit and the final exit are both recorded for every sample, on its own path (the encoder output
    # it jumped with), whichever it ended at.
    for k in (3, 4):
        want = _expected(mue, SimpleNamespace(jumped=never.jumped, exit_index=np.full(16, k)))
        np.testing.assert_allclose(never.all_exits[k]["logits"], want, rtol=1e-4, atol=1e-4)
    # A sample that jumped at exit 0 skipped exit 1 and the boundary: no score there; the decoder's gate has one.
    j0 = never.jumped == 0
    assert j0.any() and np.isnan(never.gate_scores[1][j0]).all() and np.isnan(never.gate_scores[2]).all()
    assert np.isfinite(never.gate_scores[[0, 3]]).all() and not never.gate_masks[1][j0].any()


@pytest.mark.parametrize("method", ["search", "ltt"])
def test_calibrate_holds_its_budget_on_held_out_samples(mue: dict, tmp_path: Path, method: str) -> None:
    """calibrate on a jump bundle: the quality of a sample is its final output (after the decoder, on the encoder
    output it jumped with) agreeing with the run without exits; the thresholds hold the budget on samples that
    calibration did not see, and a jump saves the segments between its exit and its target."""
    from eecompile.calibrate import calibrate_bundle, clopper_pearson_interval
    from eecompile.calibrate.jumps import JumpTable, collect_jump_table

    path = tmp_path / "cal.eebundle"
    shutil.copytree(mue["bundle"].path, path)
    cal, held = _feeds(400, seed=1), _feeds(300, seed=2)
    np.savez(tmp_path / "cal.npz", **cal)
    costs = [1.0, 1.0, 1.0, 2.0, 2.0]  # per segment: the decoder layers cost twice an encoder layer
    report = calibrate_bundle(path, tmp_path / "cal.npz", max_drop=0.1, method=method, costs=costs, quiet=True)
    assert report.deployed, report.summary_lines()
    runner = JumpRunner(path)
    m = runner.manifest
    assert len(m.thresholds) == 3 and np.isfinite(m.thresholds[0])  # one per gate: the boundary has none
    got, full = runner.run(held), runner.run(held, thresholds="never")
    assert (got.jumped >= 0).mean() > 0.05, got.jumped
    disagree = (got.outputs["logits"].argmax(-1) != full.outputs["logits"].argmax(-1)).any(axis=1)
    # Within the budget up to the sampling noise of 300 samples (the 95% interval of the held-out rate reaches it);
    # exits that jump on wrong paths would disagree far more often (a jump at exit 0 agrees on about 1 in 4).
    assert clopper_pearson_interval(int(disagree.sum()), len(disagree), 0.95)[0] <= 0.1, disagree.mean()
    assert disagree.mean() <= 0.13, disagree.mean()
    rows = {e["index"]: e for e in report.exits}
    assert rows[0]["jump_to"] == 3 and rows[0]["jumped"] > 0 and rows[2]["gate"] is None and rows[4]["share"] > 0
    # Jumping at exit 0 runs segments 0, 3, 4; leaving at the decoder exit without a jump 0-3.
    assert rows[0]["cumulative_ms"] == 5000.0 and rows[3]["cumulative_ms"] == 5000.0 and rows[4]["cumulative_ms"] == 7000.0
    assert any(n.startswith("jumped (went on at the jump target") for n in report.notes)
    # The table's model of the network is the runner's: at mixed thresholds it sends each sample down the path
    # and to the exit the runner takes.
    table = collect_jump_table(mue["bundle"], held, None, runner=runner, quiet=True)
    assert isinstance(table, JumpTable) and len(table.routes) == 3 and table.n_exits == 6
    thr = _mixed(runner, held)
    from eecompile.calibrate.search import table_exits

    ends = table_exits(table, thr)
    res = runner.run(held, thresholds=thr)
    np.testing.assert_array_equal(table.end_segment[ends], res.exit_index)
    np.testing.assert_array_equal(table.end_jump[ends], res.jumped)
    assert len(set(ends.tolist())) >= 4, np.bincount(ends)
    ok = table.correct[ends, np.arange(len(ends))]
    np.testing.assert_array_equal(ok, (res.outputs["logits"].argmax(-1) == full.outputs["logits"].argmax(-1)).all(1))


def test_calibrate_times_each_path_through_the_runner(mue: dict, tmp_path: Path) -> None:
    from eecompile.calibrate import calibrate_bundle

    path = tmp_path / "cal.eebundle"
    shutil.copytree(mue["bundle"].path, path)
    np.savez(tmp_path / "cal.npz", **_feeds(200, seed=3))
    report = calibrate_bundle(path, tmp_path / "cal.npz", max_drop=0.2, repeats=3, quiet=True,
                              reference_model=mue["model"])
    assert report.baseline == "unsplit model" and report.baseline_ms > 0
    assert all(e["cumulative_ms"] > 0 for e in report.exits) and report.expected_ms > 0


def test_bench_reports_a_jump_bundle_against_the_unsplit_model(mue: dict, tmp_path: Path) -> None:
    from eecompile.benchmark import bench_bundle

    feeds = _feeds(32, seed=4)
    np.savez(tmp_path / "in.npz", **feeds)
    thr = _mixed(mue["runner"], feeds)
    report = bench_bundle(mue["bundle"].path, tmp_path / "in.npz", batch_size=8, repeats=2, thresholds=thr,
                          reference_model=mue["model"])
    res = mue["runner"].run(feeds, thresholds=thr)
    assert [e["count"] for e in report.exit_histogram] == res.exit_counts.tolist()
    assert [report.exit_histogram[k]["jumped"] for k in (0, 1)] == [int((res.jumped == k).sum()) for k in (0, 1)]
    assert {r["name"] for r in report.references} == {"gates-never", "unsplit-model"}
    assert report.reference == "unsplit-model" and report.speedup["median"] > 0
    assert any("jumped at exit 0" in n for n in report.notes), report.notes
    assert f"exit 0 : 0 samples (0.0%), {int((res.jumped == 0).sum())} jumped" in report.lines()


@pytest.mark.slow
def test_serve_answers_predict_with_each_samples_jump(mue: dict, ray_serve) -> None:
    from ray import serve

    from eecompile.serve.ray_app import ServeOptions, run_app
    from tests.serve.client import predict_json, predict_npz

    port = ray_serve["port"]
    run_app(ServeOptions(bundle=str(mue["bundle"].path), max_batch_size=16), port=port, name="jumps",
            route_prefix="/jumps")
    try:
        feeds = mue["feeds"]
        thr = _mixed(mue["runner"], feeds)
        local = mue["runner"].run(feeds, thresholds=thr)
        status, doc = predict_json(f"http://127.0.0.1:{port}/jumps/predict", feeds, thresholds=thr)
        assert status == 200, doc
        assert doc["jumped"] == local.jumped.tolist() and doc["exit_index"] == local.exit_index.tolist()
        np.testing.assert_allclose(np.array(doc["outputs"]["logits"]), local.outputs["logits"], rtol=1e-4, atol=1e-5)
        status, npz = predict_npz(f"http://127.0.0.1:{port}/jumps/predict", feeds)
        assert status == 200 and npz["jumped"].tolist() == mue["runner"].run(feeds).jumped.tolist()
    finally:
        serve.delete("jumps")


def test_errors_after_the_jump_boundary_name_the_spec_exit(mue: dict, tmp_path: Path) -> None:
    """The decoder exit is exits[2] of the spec but segment 3 of the bundle (the boundary before the decoder is
    segment 2): a head error there names exits[2], as the spec does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((32, 5), np.float32), "w")
    head = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["logits"])], "narrow_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 6, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6, 5])], [w]),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(head, tmp_path / "narrow.onnx")
    spec = mue_spec(tmp_path, mue["model"], mue["names"])
    doc = yaml.safe_load(spec.read_text())
    doc["exits"][2]["head"] = str(tmp_path / "narrow.onnx")  # 5 classes where the final output has VOCAB
    doc["final"]["drop"] = ["logits1"]
    spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"^exits\[2\]\.head: the head gives"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")


def test_compile_summary_counts_the_gated_exits_and_names_the_jump_boundary(mue: dict) -> None:
    """`eecompile compile` said "5 segments, 4 early exits" and "segment 2: ... final exit" for this bundle, whose
    `run --thresholds` takes 3 values (the boundary before the jump target has no gate)."""
    from eecompile.cli import compile_summary

    lines = compile_summary(mue["bundle"].path, mue["bundle"].manifest)
    assert "5 segments, 3 early exits" in lines[0], lines
    assert "no exit (the boundary before a jump target)" in lines[3] and "final exit" in lines[5], lines
