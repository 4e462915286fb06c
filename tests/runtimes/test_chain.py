"""EarlyExitRunner on handmade bundles: policies agree, exits are recorded, errors name the tensor."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from eecompile.cli import cli
from eecompile.errors import BackendError, BundleError, DataError, SpecError
from eecompile.io import run_file
from eecompile.runtimes.chain import EarlyExitRunner
from eecompile.runtimes.onnxruntime import OnnxRuntimeBackend
from tests.runtimes.handmade import Handmade, make_bundle

N = 64


@pytest.fixture(scope="module")
def hm(tmp_path_factory: pytest.TempPathFactory) -> Handmade:
    return make_bundle(tmp_path_factory.mktemp("hm") / "b.eebundle")


@pytest.fixture(scope="module")
def runner(hm: Handmade) -> EarlyExitRunner:
    return EarlyExitRunner(hm.path, threads=1)


def _maxprob(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def _forced(runner: EarlyExitRunner, feeds: dict[str, np.ndarray], i: int, k: int) -> np.ndarray:
    """Sample i's output when forced out at exit k ('never' before it, 'always' at it)."""
    n_early = runner.manifest.n_early_exits
    thr = ["never" if j < k else "always" for j in range(n_early)]
    one = {name: a[i:i + 1] for name, a in feeds.items()}
    res = runner.run(one, thresholds=thr)
    assert res.exit_index[0] == k
    return res.outputs["logits"][0]


def test_matches_numpy_reference(hm: Handmade, runner: EarlyExitRunner) -> None:
    feeds = hm.inputs(N)
    ref = hm.exits(feeds["x"], feeds["ids"])
    res = runner.run(feeds, thresholds=[0.6, 0.7])
    p0, p1 = _maxprob(ref[0]), _maxprob(ref[1])
    expect = np.where(p0 >= 0.6, 0, np.where(p1 >= 0.7, 1, 2))
    clear = (np.abs(p0 - 0.6) > 1e-5) & (np.abs(p1 - 0.7) > 1e-5)  # away from float ties at the threshold
    np.testing.assert_array_equal(res.exit_index[clear], expect[clear])
    got = np.stack(ref)[res.exit_index, np.arange(N)]
    np.testing.assert_allclose(res.outputs["logits"], got, rtol=1e-5, atol=1e-5)
    assert res.exit_index.dtype == np.int64
    assert res.exit_counts.sum() == N and len(res.exit_counts) == 3
    assert set(np.unique(res.exit_index)) == {0, 1, 2}  # the bundle exercises every exit


@pytest.mark.parametrize("seed", range(5))
def test_compact_equals_wait_all_equals_forced(hm: Handmade, runner: EarlyExitRunner, seed: int) -> None:
    rng = np.random.default_rng(seed)
    feeds = hm.inputs(24, seed=seed)
    thr = [float(rng.uniform(0.4, 0.9)), float(rng.uniform(0.4, 0.9))]
    compact = runner.run(feeds, thresholds=thr, policy="compact")
    wait_all = runner.run(feeds, thresholds=thr, policy="wait-all")
    never = runner.run(feeds, thresholds=thr, policy="never")
    for other in (wait_all, never):
        np.testing.assert_array_equal(other.exit_index, compact.exit_index)
        np.testing.assert_array_equal(other.exit_counts, compact.exit_counts)
        np.testing.assert_allclose(other.outputs["logits"], compact.outputs["logits"], rtol=1e-6, atol=1e-6)
    for i in range(len(compact.exit_index)):
        row = _forced(runner, feeds, i, int(compact.exit_index[i]))
        np.testing.assert_allclose(compact.outputs["logits"][i], row, rtol=1e-5, atol=1e-6)


def test_never_policy_records_every_exit(hm: Handmade, runner: EarlyExitRunner) -> None:
    feeds = hm.inputs(N, seed=3)
    ref = hm.exits(feeds["x"], feeds["ids"])
    res = runner.run(feeds, thresholds=[0.6, 0.7], policy="never")
    assert res.all_exits is not None and res.gate_masks is not None
    assert len(res.all_exits) == 3
    for k in range(3):
        np.testing.assert_allclose(res.all_exits[k]["logits"], ref[k], rtol=1e-5, atol=1e-5)
    assert res.gate_masks.shape == (2, N) and res.gate_masks.dtype == bool
    clear = np.abs(_maxprob(ref[0]) - 0.6) > 1e-5
    np.testing.assert_array_equal(res.gate_masks[0][clear], (_maxprob(ref[0]) >= 0.6)[clear])
    # exit_index is the first exit whose gate fired.
    expect = np.where(res.gate_masks[0], 0, np.where(res.gate_masks[1], 1, 2))
    np.testing.assert_array_equal(res.exit_index, expect)


def test_never_gate_masks_are_before_override(hm: Handmade, runner: EarlyExitRunner) -> None:
    feeds = hm.inputs(N, seed=4)
    plain = runner.run(feeds, policy="never")
    forced = runner.run(feeds, thresholds=["never", "always"], policy="never")
    np.testing.assert_array_equal(forced.gate_masks, plain.gate_masks)
    assert (forced.exit_index == 1).all()


def test_threshold_strings(hm: Handmade, runner: EarlyExitRunner) -> None:
    feeds = hm.inputs(N)
    assert (runner.run(feeds, thresholds="never").exit_index == 2).all()
    assert (runner.run(feeds, thresholds="always").exit_index == 0).all()
    assert runner.run(feeds, thresholds=[math.inf, math.inf]).exit_counts.tolist() == [0, 0, N]  # a number no
    # sample reaches: the gates run and are read, none fires
    for bad in ([0.5], ["sometimes", 0.5], [float("nan"), 0.5], [2.0, 2.0], [-0.5, 0.5], [-math.inf, 0.5]):
        with pytest.raises(SpecError, match="thresholds"):
            runner.run(feeds, thresholds=bad)
    with pytest.raises(SpecError, match="policy"):
        runner.run(feeds, policy="eager")


class _SpyBackend(OnnxRuntimeBackend):
    """Records gathers and the batch size each segment ran at."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gathers: list[tuple[str, int, tuple[int, ...]]] = []
        self.batches: list[tuple[int, int]] = []

    def run_segment(self, index: int, feeds: dict[str, Any], threshold: float | None) -> dict[str, Any]:
        seg = self.manifest.segments[index]
        sizes = {feeds[t.name].shape[t.batch_axis] for t in seg.inputs if t.batch_axis is not None}
        assert len(sizes) == 1, sizes
        self.batches.append((index, sizes.pop()))
        return super().run_segment(index, feeds, threshold)

    def gather(self, x: Any, rows: np.ndarray, axis: int) -> Any:
        self.gathers.append((str(x.dtype), axis, x.shape))
        return super().gather(x, rows, axis)


def test_no_gather_when_no_sample_exits(hm: Handmade) -> None:
    from eecompile.bundle import Bundle

    spy = _SpyBackend(Bundle.load(hm.path), threads=1)
    runner = EarlyExitRunner(hm.path, backend=spy)
    feeds = hm.inputs(N)
    res = runner.run(feeds, thresholds=["never", "never"])
    assert spy.gathers == [] and (res.exit_index == 2).all()
    # With exits: seg0's hT is gathered along axis 1, pos (no batch axis) is passed untouched, ids along 0.
    runner.run(feeds, thresholds=[0.6, 0.7])
    assert any(len(s) == 3 and axis == 1 for _, axis, s in spy.gathers)  # hT [2, B, 4]
    assert all(s != (1, 2) for _, _, s in spy.gathers)  # pos is never gathered
    assert any(d == "int64" for d, _, _ in spy.gathers)  # ids carried through, compacted


def test_compact_shrinks_the_batch(hm: Handmade) -> None:
    from eecompile.bundle import Bundle

    spy = _SpyBackend(Bundle.load(hm.path), threads=1)
    runner = EarlyExitRunner(hm.path, backend=spy)
    feeds = hm.inputs(N)
    res = runner.run(feeds, thresholds=[0.6, 0.7])
    c = res.exit_counts
    assert [b for _, b in spy.batches] == [N, N - c[0], N - c[0] - c[1]]


def test_stops_when_all_exit(hm: Handmade) -> None:
    from eecompile.bundle import Bundle

    spy = _SpyBackend(Bundle.load(hm.path), threads=1)
    runner = EarlyExitRunner(hm.path, backend=spy)
    res = runner.run(hm.inputs(8), thresholds=["always", 0.5])
    assert [k for k, _ in spy.batches] == [0]
    assert res.timings[1] == 0 and res.timings[2] == 0 and res.timings[0] > 0


def test_nonfinite_never_fires(hm: Handmade, runner: EarlyExitRunner) -> None:
    feeds = hm.inputs(8)
    feeds["x"][2, 0] = np.nan
    feeds["x"][5, 1] = np.inf
    res = runner.run(feeds, thresholds=[0.0, 0.0])  # every finite sample fires at exit 0
    assert res.exit_index[2] == 2 and res.exit_index[5] == 2
    assert (np.delete(res.exit_index, [2, 5]) == 0).all()
    assert res.nonfinite_counts.tolist() == [2, 2, 2]


def test_per_sample_bundle(tmp_path: Path, hm: Handmade) -> None:
    ps = make_bundle(tmp_path / "ps.eebundle", per_sample=True)
    ps_runner = EarlyExitRunner(ps.path, threads=1)
    feeds = hm.inputs(10)
    for policy in ("compact", "wait-all", "never"):
        a = ps_runner.run(feeds, thresholds=[0.6, 0.7], policy=policy)
        b = EarlyExitRunner(hm.path, threads=1).run(feeds, thresholds=[0.6, 0.7], policy=policy)
        np.testing.assert_array_equal(a.exit_index, b.exit_index)
        np.testing.assert_array_equal(a.exit_counts, b.exit_counts)
        np.testing.assert_allclose(a.outputs["logits"], b.outputs["logits"], rtol=1e-5, atol=1e-6)
        if policy == "never":
            assert a.gate_masks.shape == (2, 10)
            np.testing.assert_allclose(a.all_exits[1]["logits"], b.all_exits[1]["logits"], rtol=1e-5, atol=1e-6)


def test_thread_safety(hm: Handmade, runner: EarlyExitRunner) -> None:
    inputs = [hm.inputs(int(n), seed=i) for i, n in enumerate(np.random.default_rng(0).integers(1, 20, 50))]
    thr = [0.6, 0.7]
    expected = [runner.run(f, thresholds=thr) for f in inputs]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for j in range(50):
                i = (j * 7 + t * 13) % len(inputs)
                res = runner.run(inputs[i], thresholds=thr, policy="compact" if j % 2 else "wait-all")
                np.testing.assert_array_equal(res.exit_index, expected[i].exit_index)
                np.testing.assert_allclose(res.outputs["logits"], expected[i].outputs["logits"], atol=1e-6)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# --------------------------------------------------------------------------------------------- errors


def test_feed_errors(hm: Handmade, runner: EarlyExitRunner) -> None:
    feeds = hm.inputs(4)
    runner.run(feeds)  # a good signature seen first (and cached) changes nothing below
    runner.run(feeds)
    with pytest.raises(DataError, match=r"missing \['ids'\].*inputs are \['x', 'ids'\]"):
        runner.run({"x": feeds["x"]})
    with pytest.raises(DataError, match="unexpected"):
        runner.run({**feeds, "y": feeds["x"]})
    with pytest.raises(DataError, match="'x' has dtype float64.*expects float32"):
        runner.run({**feeds, "x": feeds["x"].astype(np.float64)})
    with pytest.raises(DataError, match=r"'ids' has dtype float32"):
        runner.run({**feeds, "ids": feeds["ids"].astype(np.float32)})
    with pytest.raises(DataError, match=r"'x' has shape \[4, 5\].*\[B, 4\]"):
        runner.run({**feeds, "x": np.zeros((4, 5), np.float32)})
    with pytest.raises(DataError, match=r"'x' has shape \[4\]"):
        runner.run({**feeds, "x": np.zeros(4, np.float32)})
    with pytest.raises(DataError, match="disagree on the number of samples"):
        runner.run({**feeds, "x": np.zeros((3, 4), np.float32)})
    with pytest.raises(DataError, match="no samples"):
        runner.run({"x": np.zeros((0, 4), np.float32), "ids": np.zeros((0, 2), np.int64)})


def test_unknown_backend(hm: Handmade) -> None:
    with pytest.raises(BackendError, match="unknown backend 'tvm'"):
        EarlyExitRunner(hm.path, backend="tvm")
    with pytest.raises(BackendError, match="unknown option"):
        EarlyExitRunner(hm.path, thread=2)


def test_tensorrt_backend_missing_is_clear(hm: Handmade, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "eecompile.runtimes.tensorrt", None)  # import fails
    with pytest.raises(BackendError, match="tensorrt backend cannot be loaded"):
        EarlyExitRunner(hm.path, backend="tensorrt")


def test_tampered_segment_refuses_to_load(tmp_path: Path) -> None:
    hm = make_bundle(tmp_path / "t.eebundle")
    with open(hm.path / "segments/seg1.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="seg1.onnx: sha256 does not match"):
        EarlyExitRunner(hm.path)


# ---------------------------------------------------------------------------------------------- files


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_run_file(tmp_path: Path, hm: Handmade, runner: EarlyExitRunner) -> None:
    feeds = hm.inputs(50)
    data = _npz(tmp_path / "in.npz", x=feeds["x"].astype(np.float64), ids=feeds["ids"], labels=np.zeros(50))
    out = tmp_path / "out.npz"
    summary = run_file(hm.path, data, out, thresholds="0.6,0.7", batch_size=16)
    assert "50 samples" in summary and "final" in summary and "\n" not in summary
    expected = runner.run(feeds, thresholds=[0.6, 0.7])
    with np.load(out) as z:
        assert sorted(z.files) == ["exit_index", "logits"]
        np.testing.assert_array_equal(z["exit_index"], expected.exit_index)
        np.testing.assert_allclose(z["logits"], expected.outputs["logits"], atol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left

    run_file(hm.path, data, out, policy="never", batch_size=7)
    with np.load(out) as z:
        assert {"exit0.logits", "exit1.logits", "exit2.logits", "gate_masks"} <= set(z.files)
        assert z["gate_masks"].shape == (2, 50)


def test_cli_run_and_inspect(tmp_path: Path, hm: Handmade) -> None:
    feeds = hm.inputs(20)
    data = _npz(tmp_path / "in.npz", **feeds)
    out = tmp_path / "out.npz"
    cli_runner = CliRunner()
    r = cli_runner.invoke(cli, ["run", str(hm.path), "--data", str(data), "-o", str(out), "--batch", "8",
                                "--thresholds", "0.6,never", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "20 samples" in r.output
    with np.load(out) as z:
        assert z["logits"].shape == (20, 3)
        assert set(np.unique(z["exit_index"])) <= {0, 2}

    bad = _npz(tmp_path / "bad.npz", x=feeds["x"], ids=feeds["ids"].astype(np.float32))
    r = cli_runner.invoke(cli, ["run", str(hm.path), "--data", str(bad), "-o", str(tmp_path / "o2.npz")])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'ids'" in lines[0] and "float32" in lines[0] and "int64" in lines[0], r.output
    assert not (tmp_path / "o2.npz").exists()

    r = cli_runner.invoke(cli, ["inspect", str(hm.path), "--json"])
    assert r.exit_code == 0, r.output
    assert '"batch_mode": "dynamic"' in r.output
    r = cli_runner.invoke(cli, ["inspect", str(hm.path)])
    assert r.exit_code == 0, r.output
    assert "max_prob" in r.output and "seg" in r.output


def test_runtime_imports_stay_light() -> None:
    code = (
        "import sys, eecompile.runtimes.chain, eecompile.runtimes.onnxruntime\n"
        "heavy = [m for m in ('onnx', 'onnx_ir', 'torch', 'eecompile.passes', 'eecompile.compiler') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "", f"runtime imports pulled in {out.stdout.strip()}"


# ------------------------------------------------------------------------------------------ with compiler


def test_compiled_bundle_runs(tmp_path: Path) -> None:
    """A tiny MLP compiled by eecompile.compiler (heads = model outputs) runs through the runner."""
    compiler = pytest.importorskip("eecompile.compiler")
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {n: (rng.normal(size=s) * 0.7).astype(np.float32)
         for n, s in {"W1": (4, 8), "A1": (8, 3), "W2": (8, 8), "A2": (8, 3), "W3": (8, 3)}.items()}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Relu", ["m1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "A1"], ["aux1"]),
             helper.make_node("MatMul", ["h1", "W2"], ["m2"]), helper.make_node("Relu", ["m2"], ["h2"]),
             helper.make_node("MatMul", ["h2", "A2"], ["aux2"]),
             helper.make_node("MatMul", ["h2", "W3"], ["logits"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("logits", "aux1", "aux2")],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    (tmp_path / "spec.yaml").write_text(
        "model: m.onnx\n"
        "exits:\n"
        "  - {at: h1, head: {output: aux1}, gate: {kind: max_prob, threshold: 0.8}}\n"
        "  - {at: h2, head: {output: aux2}, gate: {kind: entropy, threshold: 0.3}}\n"
        "final: {output: logits}\n")
    compiler.compile_model(tmp_path / "spec.yaml", tmp_path / "m.eebundle")

    runner = EarlyExitRunner(tmp_path / "m.eebundle", threads=1)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    logits, aux1, aux2 = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})
    for thr, expect in (("never", logits), ("always", aux1), (["never", "always"], aux2)):
        np.testing.assert_allclose(runner.run({"x": x}, thresholds=thr).outputs["logits"], expect,
                                   rtol=1e-5, atol=1e-5)
    compact = runner.run({"x": x}, thresholds=[0.7, 0.4])
    wait_all = runner.run({"x": x}, thresholds=[0.7, 0.4], policy="wait-all")
    np.testing.assert_array_equal(compact.exit_index, wait_all.exit_index)
    np.testing.assert_allclose(compact.outputs["logits"], wait_all.outputs["logits"], atol=1e-6)
    stacked = np.stack([aux1, aux2, logits])
    np.testing.assert_allclose(compact.outputs["logits"], stacked[compact.exit_index, np.arange(40)], atol=1e-5)
