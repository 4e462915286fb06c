"""Prophet's staged threshold (a stricter one early in decoding, a looser one late), ``eecompile bench`` on loop
bundles, and per-step inputs given with the data (refused: the runtime fills them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import eecompile
from eecompile.errors import DataError
from eecompile.runtimes.loop import LoopRunner, stage_of
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
from tests.loops.test_denoiser_loop import STEPS as SAMPLER_STEPS
from tests.loops.test_denoiser_loop import loop_spec
from tests.loops.test_prophet_loop import STEPS, prophet_spec, reference

STAGES = [6.0, 4.0, 2.0]


@pytest.fixture(scope="module")
def loops(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("staged")
    lm, unmask = export_masked_lm(d / "mlm.onnx"), export_unmask_step(d / "unmask.onnx")
    den, ddim = export_denoiser(d / "denoiser.onnx"), export_ddim_step(d / "ddim.onnx")
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, VOCAB, size=(16, SEQ)).astype(np.int64)
    tokens[:, 2:] = MASK
    x = (rng.standard_normal((12, 3, 8, 8)) * rng.uniform(0.3, 3.0, 12)[:, None, None, None]).astype(np.float32)
    return {"dir": d, "lm": lm, "unmask": unmask, "tokens": tokens, "x": x,
            "prophet": eecompile.compile_model(prophet_spec(d, lm, unmask, threshold=STAGES), d / "p.eebundle").path,
            "sampler": eecompile.compile_model(loop_spec(d, den, ddim), d / "s.eebundle").path}


def test_steps_split_evenly_into_stages() -> None:
    assert [stage_of(i, 5, 3) for i in range(5)] == [0, 0, 1, 1, 2]
    assert [stage_of(i, 6, 3) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [stage_of(i, 2, 3) for i in range(2)] == [0, 1]  # more stages than steps: the last is not reached
    assert [stage_of(i, 4, 1) for i in range(4)] == [0, 0, 0, 0]


def test_a_staged_threshold_equals_the_loop_written_by_hand_with_per_step_thresholds(loops: dict) -> None:
    """The staged gate of the bundle, its runtime override and the CLI's give what the loop written out on the
    unsplit LM gives with each step's own threshold (5 steps, 3 stages: 6, 6, 4, 4, 2)."""
    runner, tokens = LoopRunner(loops["prophet"]), loops["tokens"]
    scores = runner.run({"tokens": tokens}, policy="never").gate_scores
    assert scores is not None
    # The profile scaled so that the middle stage (steps 3 and 4) cuts through the scores of step 3: the gap widens
    # from step to step, so no sample stops in the strict first stage and every sample stops at step 3 or 4.
    scale = float(np.median(scores[2])) / STAGES[1]
    staged = [scale * v for v in STAGES]
    per_step = [staged[0], staged[0], staged[1], staged[1], staged[2]]
    want, steps, _ = reference(loops["lm"], loops["unmask"], tokens, per_step)
    assert len(set(steps.tolist())) > 1, steps
    got = runner.run({"tokens": tokens}, loop_threshold=staged)
    np.testing.assert_array_equal(got.steps, steps)
    np.testing.assert_array_equal(got.outputs["committed"], want)
    # The first stage's threshold at every step is not the same loop (the stages matter).
    _, flat, _ = reference(loops["lm"], loops["unmask"], tokens, staged[0])
    assert (flat >= steps).all() and (flat > steps).any(), (flat, steps)
    # The bundle's own staged threshold is the unscaled profile: the same as giving it at run time.
    np.testing.assert_array_equal(runner.run({"tokens": tokens}).steps,
                                  runner.run({"tokens": tokens}, loop_threshold=STAGES).steps)
    wait = runner.run({"tokens": tokens}, loop_threshold=staged, policy="wait-all")
    np.testing.assert_array_equal(wait.outputs["committed"], want)
    # The CLI: comma-separated stage thresholds.
    from click.testing import CliRunner

    from eecompile.cli import cli

    d = loops["dir"]
    np.savez(d / "tok.npz", tokens=tokens)
    r = CliRunner().invoke(cli, ["run", str(loops["prophet"]), "--data", str(d / "tok.npz"), "-o", str(d / "o.npz"),
                                 "--loop-threshold", ",".join(repr(v) for v in staged)])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(d / "o.npz")["committed"], want)
    r = CliRunner().invoke(cli, ["run", str(loops["prophet"]), "--data", str(d / "tok.npz"), "-o", str(d / "o.npz"),
                                 "--loop-threshold", "6,high"])
    assert r.exit_code != 0 and "--loop-threshold '6,high': a staged threshold is comma-separated numbers" in r.output
    with pytest.raises(DataError, match=r"loop_threshold: a staged threshold needs at least one value"):
        runner.run({"tokens": tokens}, loop_threshold=[])
    with pytest.raises(Exception, match=r"loop_threshold\[1\]: NaN is not a threshold"):
        runner.run({"tokens": tokens}, loop_threshold=[1.0, float("nan")])


def test_bench_times_the_loop_against_all_steps(loops: dict) -> None:
    from eecompile.benchmark import bench_bundle

    d = loops["dir"]
    np.savez(d / "x.npz", x=loops["x"])
    report = bench_bundle(loops["sampler"], d / "x.npz", batch_size=4, repeats=2)
    lp = report.loop
    assert lp is not None and lp["steps"] == SAMPLER_STEPS and sum(lp["step_histogram"]) == len(loops["x"])
    assert 1.0 <= lp["mean_steps"] <= SAMPLER_STEPS
    # Against every gate never (the headline) and against the loop gate alone never (the step has a layer exit).
    assert report.reference == "gates-never" and {r["name"] for r in report.references} == {"gates-never",
                                                                                            "loop-never"}
    assert report.speedup["rounds"] == 2 and report.speedup["median"] > 0
    # The exit histogram counts sample-steps: each step's chain is one pass through the layer exit.
    runner = LoopRunner(loops["sampler"])
    counts = sum(runner.run({"x": loops["x"][i:i + 4]}).exit_counts.sum(axis=0) for i in range(0, 12, 4))
    assert [e["count"] for e in report.exit_histogram] == counts.tolist()
    assert any(line.startswith("loop: ") and f"of {SAMPLER_STEPS} steps on average" in line for line in report.lines())
    from click.testing import CliRunner

    from eecompile.cli import cli

    np.savez(d / "tok.npz", tokens=loops["tokens"])
    r = CliRunner().invoke(cli, ["bench", str(loops["prophet"]), "--data", str(d / "tok.npz"), "--batch", "8",
                                 "--repeats", "2", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["loop"]["steps"] == STEPS and got["loop"]["loop_threshold"] == STAGES
    assert [x["name"] for x in got["references"]] == ["gates-never"]  # no layer exits: the loop gate is every gate
    r = CliRunner().invoke(cli, ["bench", str(loops["prophet"]), "--data", str(d / "tok.npz"), "--repeats", "1"])
    assert r.exit_code == 0 and "of 5 steps on average" in r.output and "(staged)" in r.output, r.output
    # --steps times the loop at another step count (it used to time the bundle's loop.steps whatever was asked).
    r = CliRunner().invoke(cli, ["bench", str(loops["prophet"]), "--data", str(d / "tok.npz"), "--batch", "8",
                                 "--repeats", "1", "--steps", "3", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["loop"]
    assert got["steps"] == 3
    assert got["step_histogram"] == LoopRunner(loops["prophet"]).run({"tokens": loops["tokens"]}, steps=3
                                                                      ).step_counts.tolist()
    assert "all 3 steps" in json.loads(r.output)["references"][0]["description"]


def test_a_per_step_input_given_with_the_data_is_refused(loops: dict, tmp_path: Path) -> None:
    """'t' is filled by the runtime at every step (loop.inputs.t); given in the data file it used to be ignored
    without a word."""
    from click.testing import CliRunner

    from eecompile.cli import cli

    x = loops["x"][:4]
    np.savez(tmp_path / "in.npz", x=x, t=np.full(4, 0.5, np.float32))
    message = r"'t' is a per-step input of the loop \(loop\.inputs\.t, source 'linspace'\): the runtime fills it"
    for args in (["run", "-o", str(tmp_path / "o.npz")], ["bench", "--repeats", "1"]):
        r = CliRunner().invoke(cli, [args[0], str(loops["sampler"]), "--data", str(tmp_path / "in.npz"), *args[1:]])
        assert r.exit_code != 0 and "in.npz: 't' is a per-step input of the loop" in r.output, r.output
        assert "leave it out (give only 'x')" in r.output
    assert not (tmp_path / "o.npz").exists()
    runner = LoopRunner(loops["sampler"])
    with pytest.raises(DataError, match=r"feeds: " + message):
        runner.run({"x": x, "t": np.full(4, 0.5, np.float32)})


def test_bench_refuses_a_reference_model_on_a_loop_bundle(tmp_path: Path) -> None:
    """The unsplit model is one step of the loop: `bench --reference-model` on a loop bundle is refused, naming the
    option (as `calibrate` refuses it), instead of being ignored while the report times the loop against itself."""
    from click.testing import CliRunner

    from eecompile.cli import cli

    model = export_halve(tmp_path / "halve.onnx")
    (tmp_path / "l.yaml").write_text(f"model: {model}\nloop: {{steps: 4, feedback: {{y: x}}, gate: {{kind: change, "
                                     f"of: y, threshold: 0.01}}}}\n")
    bundle = eecompile.compile_model(tmp_path / "l.yaml", tmp_path / "l.eebundle", engines=False).path
    np.savez(tmp_path / "x.npz", x=np.ones((3, 4), np.float32))
    res = CliRunner().invoke(cli, ["bench", str(bundle), "--data", str(tmp_path / "x.npz"), "--repeats", "1",
                                   "--reference-model", str(model)])
    assert res.exit_code == 1 and "--reference-model" in res.output and "leave the option out" in res.output, res.output
