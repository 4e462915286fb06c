"""A DDIM sampler around a small denoiser as a loop bundle: the denoiser (with a DeeDiff-style layer exit inside
each step) is the chain, the DDIM update the step graph, ``x_next`` fed back as ``x``, the time fed per step, and a
per-sample ``change`` gate that stops a sample's loop (its result: the step's predicted clean image ``x0``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.errors import BundleError, DataError, SpecError
from eecompile.runtimes.loop import LoopRunner
from tests.loops.models import (
    B1,
    ddim_reference,
    export_ddim_step,
    export_denoiser,
    export_halve,
    export_scale_shift,
)

STEPS = 20  # the default step count; run(steps=N) chooses another
START = 0.98


def loop_spec(d: Path, den: Path, step: Path, steps: int = STEPS, exits: bool = True, name: str = "spec.yaml",
              **loop: object) -> Path:
    doc: dict = {
        "model": str(den),
        "exits": ([{"at": B1, "head": {"output": "eps1", "score_output": "conf1"},
                    "gate": {"kind": "score", "threshold": 0.5}}] if exits else []),
        "final": {"output": "eps", "task": "regression", **({} if exits else {"drop": ["eps1", "conf1"]})},
        "loop": {"steps": steps, "step": str(step), "feedback": {"x_next": "x"},
                 "inputs": {"t": {"source": "linspace", "start": START, "end": 0.0},
                            "t_next": {"source": "linspace", "start": START, "end": 0.0, "offset": 1}},
                 "gate": {"kind": "change", "of": "x_next", "threshold": 0.2}, "commit": "x0", **loop},
    }
    path = d / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sampler(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("ddim")
    den, step = export_denoiser(d / "denoiser.onnx"), export_ddim_step(d / "ddim.onnx")
    bundle = eecompile.compile_model(loop_spec(d, den, step), d / "ddim.eebundle")
    rng = np.random.default_rng(0)
    # Different noise scales make the samples converge at different steps.
    x = (rng.standard_normal((10, 3, 8, 8)) * np.linspace(0.3, 3.0, 10)[:, None, None, None]).astype(np.float32)
    return {"dir": d, "denoiser": den, "step": step, "bundle": bundle, "x": x, "runner": LoopRunner(bundle)}


def _mixed_loop_threshold(runner: LoopRunner, x: np.ndarray, thresholds: object = "never") -> float:
    scores = runner.run({"x": x}, thresholds=thresholds, policy="never").gate_scores
    assert scores is not None
    return float(np.median(scores[3]))  # between samples: some stop at step 4, others later


def test_loop_equals_the_sampler_written_by_hand(sampler: dict) -> None:
    runner, x = sampler["runner"], sampler["x"]
    thr = _mixed_loop_threshold(runner, x)
    res = runner.run({"x": x}, thresholds="never", loop_threshold=thr)
    x0, steps = ddim_reference(sampler["denoiser"], sampler["step"], x, STEPS, thr, START)
    np.testing.assert_array_equal(res.steps, steps)
    np.testing.assert_allclose(res.outputs["x0"], x0, rtol=1e-4, atol=1e-4)
    assert 1 < res.steps.min() < res.steps.max(), res.steps  # samples stopped at different steps
    assert res.batch_sizes[0] == len(x) and res.batch_sizes[-1] < len(x)  # stopped samples left the batch
    assert res.step_counts.sum() == len(x)


def test_compact_equals_wait_all_equals_never_equals_one_sample_at_a_time(sampler: dict) -> None:
    runner, x = sampler["runner"], sampler["x"]
    never = runner.run({"x": x}, thresholds="never", policy="never", loop_threshold="never")
    conf = np.median(runner.chain.run({"x": x, "t": np.full(len(x), START, np.float32)}, thresholds="never",
                                      policy="never").gate_scores[0])
    thr = _mixed_loop_threshold(runner, x, [float(conf)])
    kw = {"thresholds": [float(conf)], "loop_threshold": thr}
    compact = runner.run({"x": x}, **kw)
    wait = runner.run({"x": x}, policy="wait-all", **kw)
    rec = runner.run({"x": x}, policy="never", **kw)
    assert never.steps.tolist() == [STEPS] * len(x)
    inner = compact.exit_counts.sum(axis=0)
    assert inner[0] > 0 and inner[1] > 0, compact.exit_counts  # the layer exit fired inside the steps, not always
    assert 1 < compact.steps.min() < compact.steps.max()
    for other in (wait, rec):
        np.testing.assert_array_equal(other.steps, compact.steps)
        for name in ("x_next", "x0"):
            np.testing.assert_allclose(other.outputs[name], compact.outputs[name], rtol=1e-5, atol=1e-6)
    assert wait.batch_sizes == [len(x)] * int(compact.steps.max())
    for b in range(len(x)):
        one = runner.run({"x": x[b:b + 1]}, **kw)
        assert one.steps[0] == compact.steps[b]
        np.testing.assert_allclose(one.outputs["x0"][0], compact.outputs["x0"][b], rtol=1e-5, atol=1e-6)
    # The gate's own record agrees with where each sample stopped.
    assert rec.gate_masks is not None
    first = np.where(rec.gate_masks.any(axis=0), rec.gate_masks.argmax(axis=0) + 1, STEPS)
    np.testing.assert_array_equal(np.minimum(first, STEPS), compact.steps)


def test_steps_are_chosen_at_run_time(sampler: dict) -> None:
    runner, x = sampler["runner"], sampler["x"][:3]
    for n in (3, 25):
        res = runner.run({"x": x}, steps=n, thresholds="never", loop_threshold="never")
        assert res.steps.tolist() == [n] * 3 and len(res.batch_sizes) == n
        x0, _ = ddim_reference(sampler["denoiser"], sampler["step"], x, n, -1.0, START)
        np.testing.assert_allclose(res.outputs["x0"], x0, rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match=r"steps: expected a positive integer"):
        runner.run({"x": x}, steps=0)


def test_a_schedule_table_in_the_bundle(sampler: dict, tmp_path: Path) -> None:
    """The times as a table of N + 1 entries (read entry by entry at N steps, resampled at another N) give the
    same sampler as the linspace source."""
    n = 10
    table = [START * (1 - j / n) for j in range(n + 1)]
    spec = loop_spec(tmp_path, sampler["denoiser"], sampler["step"], steps=n,
                     inputs={"t": {"source": "table", "values": table},
                             "t_next": {"source": "table", "values": table, "offset": 1}})
    runner = LoopRunner(eecompile.compile_model(spec, tmp_path / "table.eebundle"))
    x, off = sampler["x"][:4], {"thresholds": "never", "loop_threshold": "never"}
    for steps in (n, 5):
        got = runner.run({"x": x}, steps=steps, **off).outputs["x0"]
        want = sampler["runner"].run({"x": x}, steps=steps, **off).outputs["x0"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bad = loop_spec(tmp_path, sampler["denoiser"], sampler["step"], name="bad.yaml",
                    inputs={"t": {"source": "table"}, "t_next": {"source": "step"}})
    with pytest.raises(SpecError, match=r"loop\.inputs\.t \(line \d+\): source 'table' needs 'values'"):
        eecompile.compile_model(bad, tmp_path / "bad.eebundle")


def test_bundle_size_does_not_depend_on_the_step_count(sampler: dict) -> None:
    d = sampler["dir"]

    def weights(bundle: Path) -> int:  # every file but the manifest
        return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.yaml")

    sizes = {}
    for n in (4, 40):
        b = eecompile.compile_model(loop_spec(d, sampler["denoiser"], sampler["step"], steps=n, name=f"s{n}.yaml"),
                                    d / f"s{n}.eebundle")
        sizes[n] = weights(b.path)
    assert sizes[40] / sizes[4] == pytest.approx(1.0, abs=0.01)
    models = sampler["denoiser"].stat().st_size + sampler["step"].stat().st_size
    # The chain and the step graph, each stored once (plus gates and node names); unrolled, 4 steps would be 4x.
    assert sizes[4] / models < 1.3, (sizes, models)


def test_run_cli_and_api_take_steps(sampler: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from eecompile.cli import cli

    x = sampler["x"][:4]
    np.savez(tmp_path / "in.npz", x=x)
    out = tmp_path / "out.npz"
    r = CliRunner().invoke(cli, ["run", str(sampler["bundle"].path), "--data", str(tmp_path / "in.npz"), "-o",
                                 str(out), "--steps", "5", "--loop-threshold", "never", "--thresholds", "never"])
    assert r.exit_code == 0, r.output
    got = np.load(out)
    assert got["steps"].tolist() == [5] * 4 and "4 samples" in r.output
    api = eecompile.load(sampler["bundle"].path).run({"x": x}, steps=5, thresholds="never", loop_threshold="never")
    np.testing.assert_allclose(got["x0"], api.outputs["x0"], rtol=1e-6)
    from eecompile.device import main  # the device entry point (no click) takes the same options

    assert main(["run", str(sampler["bundle"].path), "--data", str(tmp_path / "in.npz"), "-o", str(tmp_path / "d.npz"),
                 "--steps", "5", "--loop-threshold", "never", "--thresholds", "never"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "d.npz")["x0"], got["x0"])
    assert set(got.files) >= {"x_next", "x0", "steps"}
    from eecompile.inspect import describe_bundle
    from eecompile.runtimes.chain import EarlyExitRunner

    with pytest.raises(BundleError, match=r"a loop bundle .*would run one step of it: run the loop with"):
        EarlyExitRunner(sampler["bundle"])  # so serve refuses it too (run, bench and calibrate drive the loop)
    loop = describe_bundle(sampler["bundle"].path)["loop"]
    assert loop["steps"] == STEPS and loop["feedback"] == [{"output": "x_next", "input": "x"}]


# ------------------------------------------------------------------------------------------- bad input


def test_a_fed_back_output_that_does_not_fit_its_input_is_refused(sampler: dict, tmp_path: Path) -> None:
    den, step = sampler["denoiser"], sampler["step"]
    spec = loop_spec(tmp_path, den, step, feedback={"x_next": "t"},
                     inputs={"t_next": {"source": "linspace", "start": START, "end": 0.0, "offset": 1}})
    with pytest.raises(SpecError, match=r"loop\.feedback\.x_next: the fed-back output 'x_next' does not fit the "
                                        r"input 't' .*rank 4 vs 1"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
    # Another dtype: a step graph giving x_next in float16.
    import onnx

    half = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 3, 8, 8] x, float[N, 3, 8, 8] eps) => (float16[N, 3, 8, 8] x_next) {
            d = Sub(x, eps)
            x_next = Cast<to = 10>(d)
        }""")
    onnx.save(half, tmp_path / "half.onnx")
    spec = loop_spec(tmp_path, den, tmp_path / "half.onnx")
    doc = yaml.safe_load(spec.read_text())
    doc["loop"]["inputs"] = {"t": {"source": "linspace", "start": START, "end": 0.0}}
    del doc["loop"]["commit"]
    spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"loop\.feedback\.x_next: .*dtype float16 vs float32"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert not (tmp_path / "b.eebundle").exists()


def test_a_manifest_whose_feedback_does_not_fit_is_refused_on_load(sampler: dict, tmp_path: Path) -> None:
    import shutil

    b = tmp_path / "b.eebundle"
    shutil.copytree(sampler["bundle"].path, b)
    doc = yaml.safe_load((b / "manifest.yaml").read_text())
    doc["loop"]["feedback"][0]["input"] = "t"
    (b / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(BundleError, match=r"loop\.feedback\[0\]: fed-back output 'x_next' does not fit input 't' "
                                          r"\(shape .*rank 4 vs 1\)"):
        eecompile.load(b)


@pytest.mark.parametrize(("change", "message"), [
    ({"gate": {"kind": "top2", "threshold": 1}}, r"loop\.gate\.kind \(line \d+\): unknown loop gate kind 'top2'"),
    ({"inputs": {"t": {"source": "linspaced", "start": 1, "end": 0}}},
     r"loop\.inputs\.t\.source \(line \d+\): unknown step input source 'linspaced'; did you mean 'linspace'\?"),
    ({"steps": 0}, r"loop\.steps \(line \d+\): expected a positive integer"),
    ({"gate": {"kind": "change", "threshold": 0.1}}, r"loop\.gate \(line \d+\): loop gate 'change' needs 'of'"),
    ({"feedback": {"x_next": "x", "x0": "x"}}, r"input 'x' is already fed back from 'x_next'"),
    ({"gate": {"kind": "change", "of": "x_next", "threshold": -1}}, r"threshold -1 is outside \[0, inf\]"),
])
def test_bad_loop_specs_name_the_yaml_path(sampler: dict, tmp_path: Path, change: dict, message: str) -> None:
    spec = loop_spec(tmp_path, sampler["denoiser"], sampler["step"], **change)
    with pytest.raises(SpecError, match=message):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")


@pytest.mark.parametrize("export, exits", [(export_halve, None), (export_scale_shift, None), (export_scale_shift, [])])
def test_a_loop_without_a_step_graph_or_a_gate(tmp_path: Path, export: Callable[[Path], Path], exits: list | None
                                               ) -> None:
    """The chain's own output fed back (y = 0.5 x + 1 converges to 2); with a change gate the graph holds only the
    gate; without one, every sample runs N steps and the bundle has no step graph. ``export_scale_shift`` has no op
    the partition counts as compute: its one segment is the whole model (it was refused as "nothing left after the
    last exit", with no exit in the spec)."""
    export(tmp_path / "halve.onnx")
    doc: dict = {"model": str(tmp_path / "halve.onnx"),
                 "loop": {"steps": 30, "feedback": {"y": "x"}, "gate": {"kind": "change", "of": "y", "threshold": 1e-3}}}
    if exits is not None:
        doc["exits"] = exits
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(doc))
    runner = eecompile.load(eecompile.compile_model(tmp_path / "g.yaml", tmp_path / "g.eebundle").path)
    x = np.array([[0, 0, 0, 0], [2, 2, 2, 2.001], [100, -100, 50, 0]], np.float32)
    res = runner.run({"x": x})
    assert res.steps[1] == 1 and res.steps[0] < res.steps[2] < 30, res.steps
    np.testing.assert_allclose(res.outputs["y"], 2.0, atol=5e-3)
    # change <= +inf holds for every finite change: a threshold in the gate's range [0, inf] (the runtime refused it)
    assert runner.run({"x": x}, loop_threshold=math.inf).steps.tolist() == [1, 1, 1]
    del doc["loop"]["gate"]
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(doc))
    bundle = eecompile.compile_model(tmp_path / "n.yaml", tmp_path / "n.eebundle")
    assert bundle.manifest.loop is not None and bundle.manifest.loop["file"] is None
    res = eecompile.load(bundle.path).run({"x": x}, steps=3)
    np.testing.assert_allclose(res.outputs["y"], 0.125 * x + 1.75, rtol=1e-6)
    assert res.steps.tolist() == [3, 3, 3]
    with pytest.raises(DataError, match=r"loop_threshold: this loop has no gate"):
        eecompile.load(bundle.path).run({"x": x}, loop_threshold=0.5)



def test_run_names_the_thresholds_option_on_a_loop_bundle(tmp_path: Path) -> None:
    """`run --thresholds` with the wrong count said "thresholds: got 2 values ..." on a loop bundle and
    "--thresholds: ..." on any other bundle."""
    from click.testing import CliRunner

    from eecompile.cli import cli
    from tests.loops.models import export_shift, shift_loop_spec

    bundle = eecompile.compile_model(shift_loop_spec(tmp_path, export_shift(tmp_path / "shift.onnx")),
                                     tmp_path / "l.eebundle", engines=False).path
    np.savez(tmp_path / "in.npz", x=np.ones((2, 4), np.float32))
    r = CliRunner().invoke(cli, ["run", str(bundle), "--data", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz"),
                                 "--thresholds", "0.5,0.5"])
    assert r.exit_code == 1 and "error: --thresholds: got 2 values for 0 early exits" in r.output, r.output
