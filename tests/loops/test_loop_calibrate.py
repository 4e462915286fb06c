"""``eecompile calibrate`` on loop bundles: the loop gate's threshold for a quality budget against all N steps.

The DDIM sampler around the small denoiser (a DeeDiff-style layer exit inside every step; float result: an error
budget in relative L2) and Prophet's early commit in the masked diffusion LM (integer result: the share of samples
whose committed tokens change), each calibrated on one half of the data and checked on the other half."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.bundle import Bundle
from eecompile.calibrate import calibrate_bundle
from eecompile.calibrate.stats import clopper_pearson_interval
from eecompile.errors import CalibrationError, DataError, SpecError
from eecompile.runtimes.loop import LoopRunner
from tests.loops.models import (
    MASK,
    SEQ,
    VOCAB,
    export_ddim_step,
    export_denoiser,
    export_halve,
    export_masked_lm,
    export_unmask_step,
)
from tests.loops.test_denoiser_loop import STEPS, loop_spec
from tests.loops.test_prophet_loop import prophet_spec


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("loopcal")
    den, ddim = export_denoiser(d / "denoiser.onnx"), export_ddim_step(d / "ddim.onnx")
    lm, unmask = export_masked_lm(d / "mlm.onnx"), export_unmask_step(d / "unmask.onnx")
    rng = np.random.default_rng(0)
    n = 160
    x = (rng.standard_normal((n, 3, 8, 8)) * rng.uniform(0.3, 3.0, n)[:, None, None, None]).astype(np.float32)
    tokens = rng.integers(1, VOCAB, size=(n, SEQ)).astype(np.int64)
    tokens[:, 2:] = MASK
    for name, arrays in {"x_cal": {"x": x[: n // 2]}, "x_test": {"x": x[n // 2:]},
                         "tok_cal": {"tokens": tokens[: n // 2]}, "tok_test": {"tokens": tokens[n // 2:]}}.items():
        np.savez(d / f"{name}.npz", **arrays)
    return {"dir": d, "x": x, "tokens": tokens, "n": n,
            "sampler": eecompile.compile_model(loop_spec(d, den, ddim), d / "ddim.eebundle").path,
            "prophet": eecompile.compile_model(prophet_spec(d, lm, unmask, threshold=[6.0, 4.0, 2.0]),
                                               d / "prophet.eebundle").path}


def _copy(built: dict, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"{name}.eebundle"
    shutil.copytree(built[name], dst)
    return dst


def _rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)


def test_calibrate_the_sampler_loop_holds_the_error_budget_on_held_out_samples(built: dict, tmp_path: Path) -> None:
    bundle, d = _copy(built, "sampler", tmp_path), built["dir"]
    eps, budget = 0.02, 0.1
    report = calibrate_bundle(bundle, d / "x_cal.npz", max_drop=budget, error_budget=eps, confidence=0.9,
                              costs=[1e-3] * STEPS)
    assert report.deployed and report.steps == STEPS
    assert 1.0 <= report.mean_steps < STEPS and report.expected_speedup > 1.0  # samples stop early
    m = Bundle.load(bundle).manifest
    assert m.loop is not None and m.loop["gate"]["threshold"] == pytest.approx(report.loop_threshold)
    assert m.calibration["reference"] == f"all {STEPS} steps"
    # The other half, run as deployed (the bundle's threshold, compact) against all N steps.
    runner = LoopRunner(bundle)
    x = built["x"][built["n"] // 2:]
    got = runner.run({"x": x})
    full = runner.run({"x": x}, loop_threshold="never")
    over = int((_rel_l2(got.outputs["x0"], full.outputs["x0"]) > eps).sum())
    low, _ = clopper_pearson_interval(over, len(x), 0.95)
    assert low <= budget, (over, len(x))  # the held-out share over the error budget does not contradict it
    assert got.steps.mean() < STEPS
    # The calibration's own figures are those of the runner on the calibration half.
    cal = built["x"][: built["n"] // 2]
    again = runner.run({"x": cal})
    assert again.steps.mean() == pytest.approx(report.mean_steps)


@pytest.mark.parametrize("method", ["search", "ltt"])
def test_calibrate_prophet_scales_its_staged_threshold_and_holds_the_budget(built: dict, tmp_path: Path,
                                                                             method: str) -> None:
    bundle, d = _copy(built, "prophet", tmp_path), built["dir"]
    budget = 0.2
    report = calibrate_bundle(bundle, d / "tok_cal.npz", max_drop=budget, method=method, costs=[1e-3] * 5)
    assert report.deployed and report.profile == [6.0, 4.0, 2.0]
    assert report.scale is not None and report.loop_threshold == pytest.approx([report.scale * v for v in (6, 4, 2)])
    m = Bundle.load(bundle).manifest
    assert m.loop is not None and m.loop["gate"]["threshold"] == pytest.approx(report.loop_threshold)
    runner = LoopRunner(bundle)
    tokens = built["tokens"][built["n"] // 2:]
    # The stage thresholds written (float32 in the step graph) decide as the search did on the calibration half.
    assert runner.run({"tokens": built["tokens"][: built["n"] // 2]}).steps.mean() == pytest.approx(report.mean_steps)
    got, full = runner.run({"tokens": tokens}), runner.run({"tokens": tokens}, loop_threshold="never")
    differ = int((got.outputs["committed"] != full.outputs["committed"]).any(axis=1).sum())
    low, _ = clopper_pearson_interval(differ, len(tokens), 0.95)
    assert low <= budget, (differ, len(tokens))
    assert got.steps.mean() < 5  # samples commit early


def test_calibrate_cli_measures_the_loop_and_writes_the_step_count(built: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from eecompile.cli import cli

    bundle, d = _copy(built, "prophet", tmp_path), built["dir"]
    r = CliRunner().invoke(cli, ["calibrate", str(bundle), "--data", str(d / "tok_cal.npz"), "--max-drop", "0.2",
                                 "--steps", "4", "--stages", "3,1", "--plot", str(tmp_path / "loop.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "loop.png").stat().st_size > 0
    assert "stop after" in r.output and "of 4 steps on average" in r.output and "ms per step" in r.output
    m = Bundle.load(bundle).manifest
    assert m.loop is not None and m.loop["steps"] == 4 and len(m.loop["gate"]["threshold"]) == 2
    cal = m.calibration
    assert cal["steps"] == 4 and cal["profile"] == [3.0, 1.0] and cal["expected_speedup"] > 0
    from eecompile.inspect import describe_bundle

    assert describe_bundle(bundle)["loop"]["steps"] == 4
    r = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert r.exit_code == 0 and "(staged)" in r.output, r.output


def test_device_calibrate_takes_steps_and_prints_the_loop_summary(built: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """eecompile-device calibrate on a loop bundle: --steps and --stages as `eecompile calibrate` has them, and its
    summary (the loop gate's threshold, the mean steps; it used to print the table's per-step thresholds)."""
    from eecompile.device import main as device

    bundle, d = _copy(built, "prophet", tmp_path), built["dir"]
    assert device(["calibrate", str(bundle), "--data", str(d / "tok_cal.npz"), "--max-drop", "0.2", "--steps", "4",
                   "--stages", "3,1", "--repeats", "5", "--threads", "1"]) == 0
    first, *rest = capsys.readouterr().out.splitlines()
    m = Bundle.load(bundle).manifest
    assert m.loop is not None and m.loop["steps"] == 4 and m.calibration["profile"] == [3.0, 1.0]
    shown = ", ".join(f"{v:.4g}" for v in m.loop["gate"]["threshold"])
    assert first.startswith(f"{bundle}: loop gate logit_gap: threshold [{shown}] (staged: "), first
    assert first.endswith(f"{m.calibration['mean_steps']:.2f} of 4 steps on average"), first
    assert any(line.startswith("expected ") and "speedup" in line for line in rest), rest
    assert not any(line.startswith(f"{bundle}: thresholds") for line in [first, *rest])


def test_a_budget_the_data_cannot_bound_leaves_the_bundle_as_it_was(built: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from eecompile.cli import cli

    bundle, d = _copy(built, "prophet", tmp_path), built["dir"]
    before = (bundle / "manifest.yaml").read_text()
    r = CliRunner().invoke(cli, ["calibrate", str(bundle), "--data", str(d / "tok_cal.npz"), "--max-drop", "0.001"])
    assert r.exit_code == 1 and "NOT DEPLOYED" in r.output and "the bundle is unchanged" in r.output, r.output
    assert (bundle / "manifest.yaml").read_text() == before


def test_too_few_samples_for_the_budget_says_how_many_zero_errors_need(built: dict, tmp_path: Path) -> None:
    """8 samples cannot bound a share of 0.1 even with none off: the note says so in words and gives the count
    needed (it used to read 'has at most -1 samples off in 8')."""
    bundle = _copy(built, "prophet", tmp_path)
    np.savez(tmp_path / "few.npz", tokens=built["tokens"][:8])
    report = calibrate_bundle(bundle, tmp_path / "few.npz", max_drop=0.1, costs=[1e-3] * 5)
    assert not report.deployed and report.allowed_errors == -1
    text = "\n".join(report.summary_lines())
    assert "-1" not in text, text
    assert (f"8 samples cannot bound the share of samples off below 0.1 at confidence 0.95 (even zero samples off "
            f"need {report.samples_needed} samples)") in text, text


# ------------------------------------------------------------------------------------------- bad input


def test_calibrate_refuses_bad_loop_input_with_one_clear_error(built: dict, tmp_path: Path) -> None:
    sampler, prophet, d = _copy(built, "sampler", tmp_path), _copy(built, "prophet", tmp_path), built["dir"]
    kw = {"max_drop": 0.1, "costs": [1e-3] * STEPS}
    np.savez(tmp_path / "no_x.npz", y=built["x"][:8])
    with pytest.raises(DataError, match=r"no_x\.npz: no array named 'x' \(a model input\)"):
        calibrate_bundle(sampler, tmp_path / "no_x.npz", error_budget=0.05, **kw)
    np.savez(tmp_path / "with_t.npz", x=built["x"][:8], t=np.zeros(8, np.float32))
    with pytest.raises(DataError, match=r"with_t\.npz: 't' is a per-step input of the loop \(loop\.inputs\.t, "
                                        r"source 'linspace'\): the runtime fills it at every step"):
        calibrate_bundle(sampler, tmp_path / "with_t.npz", error_budget=0.05, **kw)
    with pytest.raises(CalibrationError, match=r"the loop's result 'x0' is a float tensor.*give --error-budget EPS"):
        calibrate_bundle(sampler, d / "x_cal.npz", **kw)
    with pytest.raises(CalibrationError, match=r"the loop's result \(committed\) is integer.*leave out --error-budget"):
        calibrate_bundle(prophet, d / "tok_cal.npz", error_budget=0.05, max_drop=0.1)
    with pytest.raises(CalibrationError, match=r"the profile \[1\.0, 0\.0\] must be positive finite numbers"):
        calibrate_bundle(prophet, d / "tok_cal.npz", max_drop=0.1, stages=[1.0, 0.0], costs=[1e-3] * 5)
    with pytest.raises(CalibrationError, match=r"the loop runs 1 step: there is no step to stop after early"):
        calibrate_bundle(prophet, d / "tok_cal.npz", max_drop=0.1, steps=1, costs=[1e-3])
    with pytest.raises(CalibrationError, match=r"costs has 3 entries; it needs one per step \(5\)"):
        calibrate_bundle(prophet, d / "tok_cal.npz", max_drop=0.1, costs=[1e-3] * 3)
    with pytest.raises(CalibrationError, match=r"--reference-model m\.onnx: a loop bundle's speedup is against its own"):
        calibrate_bundle(prophet, d / "tok_cal.npz", max_drop=0.1, reference_model="m.onnx")


def test_loop_options_on_a_bundle_without_a_loop_are_refused(built: dict, tmp_path: Path) -> None:
    doc = yaml.safe_load(loop_spec(tmp_path, built["dir"] / "denoiser.onnx", built["dir"] / "ddim.onnx").read_text())
    del doc["loop"]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(doc))
    bundle = eecompile.compile_model(tmp_path / "plain.yaml", tmp_path / "plain.eebundle")
    np.savez(tmp_path / "in.npz", x=built["x"][:8], t=np.zeros(8, np.float32))
    with pytest.raises(CalibrationError, match=r"--steps and --stages are for loop bundles"):
        calibrate_bundle(bundle.path, tmp_path / "in.npz", max_drop=0.1, error_budget=0.05, steps=5)


def test_calibrate_refuses_a_loop_without_a_gate(tmp_path: Path) -> None:
    export_halve(tmp_path / "halve.onnx")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"model": str(tmp_path / "halve.onnx"),
                                                     "loop": {"steps": 3, "feedback": {"y": "x"}}}))
    bundle = eecompile.compile_model(tmp_path / "s.yaml", tmp_path / "s.eebundle")
    np.savez(tmp_path / "x.npz", x=np.ones((4, 4), np.float32))
    with pytest.raises(CalibrationError, match=r"the loop has no gate \(loop\.gate\): every sample runs every step"):
        calibrate_bundle(bundle.path, tmp_path / "x.npz", max_drop=0.1)


@pytest.mark.parametrize(("threshold", "message"), [
    ([], r"loop\.gate\.threshold \(line \d+\): a staged threshold needs at least one value"),
    ([5.0, -1.0], r"loop\.gate\.threshold\[1\] \(line \d+\): threshold -1 is outside \[0, inf\]"),
    ([5.0, "high"], r"loop\.gate\.threshold\[1\] \(line \d+\): expected a number, got 'high'"),
])
def test_bad_staged_thresholds_in_the_spec_name_the_yaml_path(built: dict, tmp_path: Path, threshold: list,
                                                               message: str) -> None:
    d = built["dir"]
    spec = prophet_spec(tmp_path, d / "mlm.onnx", d / "unmask.onnx", threshold=threshold)
    with pytest.raises(SpecError, match=message):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
