"""Speculative calibration per batch size: the measured best (threshold, k), or drafting off where it does not pay."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from eecompile.bundle import Bundle
from eecompile.decoder.calibrate import calibrate_speculative, choice_for_batch, interleaved, speed_decision
from eecompile.errors import CalibrationError
from eecompile.runtimes.lm import DecoderRunner

PROMPTS = [[5, 17, 33], [90, 2, 41, 7], [11], [3, 1, 4, 1, 5]]


def test_choice_for_batch_takes_the_largest_calibrated_size_not_above() -> None:
    cal = {"speculative": {"1": {"threshold": 0.5, "draft_tokens": 4}, "4": {"off": True}}}
    assert choice_for_batch(cal, 1)["threshold"] == 0.5  # type: ignore[index]
    assert choice_for_batch(cal, 3)["threshold"] == 0.5  # type: ignore[index]
    assert choice_for_batch(cal, 8)["off"] is True  # type: ignore[index]
    assert choice_for_batch(None, 2) is None


def test_choice_for_batch_reads_exit_mode_entries() -> None:
    cal = {"speculative": {"1": {"off": True}}, "exit": {"thresholds": [0.5], "batches": {"1": {"speedup": 1.2},
                                                                                         "4": {"off": True}}}}
    assert "off" not in choice_for_batch(cal, 2, mode="exit")  # type: ignore[operator]
    assert choice_for_batch(cal, 8, mode="exit")["off"] is True  # type: ignore[index]
    assert choice_for_batch({"exit": {"thresholds": [0.5]}}, 4, mode="exit") is None  # calibrated before


def test_interleaved_pairs_each_run_with_the_plain_runs_around_it() -> None:
    plains = iter([10.0, 20.0, 30.0])
    out = interleaved(lambda: next(plains), [lambda: 15.0, lambda: 50.0])
    assert out["ratios"] == [15.0 / 15.0, 50.0 / 25.0] and out["plain"] == [10.0, 20.0, 30.0]


@pytest.mark.parametrize(("ratios", "min_speedup", "on"), [
    ([1.2, 1.1, 0.98, 1.3, 1.15], 1.0, True),   # median 1.15, lower quartile 1.1
    ([1.5, 1.4, 0.8, 0.7, 1.3], 1.0, False),    # median 1.3 but two rounds of five slower than plain
    ([1.2, 1.1, 1.05, 1.3, 1.15], 1.2, False),  # every round faster, median below the minimum asked for
    ([0.5, 0.6, 0.7], 0.0, True),               # a minimum of 0 keeps the mode on
])
def test_speed_decision_takes_the_median_and_the_lower_quartile(ratios: list[float], min_speedup: float,
                                                                on: bool) -> None:
    import numpy as np

    got = speed_decision(ratios, min_speedup)
    assert got["on"] is on
    assert got["speedup"] == pytest.approx(float(np.median(ratios)))
    assert got["speedup_q1"] == pytest.approx(float(np.percentile(ratios, 25)))
    with pytest.raises(CalibrationError, match="rounds"):
        speed_decision([], 1.0)


def test_calibration_is_written_and_used(lm_bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "b.eebundle"
    shutil.copytree(lm_bundle, dest)
    # a speedup no configuration reaches: drafting is switched off at batch 1, on at batch 2
    table = calibrate_speculative(dest, batches=(1,), thresholds=(0.3,), ks=(2,), tokens=6, prompts=PROMPTS,
                                  min_speedup=1e9, threads=1, rounds=2)
    assert table["1"]["off"] is True and len(table["1"]["speedup_rounds"]) == 2
    table2 = calibrate_speculative(dest, batches=(2,), thresholds=(0.0, 0.3), ks=(2, 3), tokens=6, prompts=PROMPTS,
                                   min_speedup=0.0, threads=1, rounds=3)
    assert table2["2"]["threshold"] in (0.0, 0.3) and table2["2"]["draft_tokens"] in (2, 3)
    assert len(table2["2"]["grid"]) == 4 and len(table2["2"]["speedup_rounds"]) == 3
    cal = Bundle.load(dest).manifest.decoder["calibration"]  # type: ignore[index]
    assert set(cal["speculative"]) == {"2"}  # the second run replaced the first
    r = DecoderRunner(dest, threads=1)
    plain = [x["token_ids"] for x in r.generate(PROMPTS, 8).results]
    on = r.generate(PROMPTS[:2], 8, mode="speculative", batch=2)
    assert "drafting_off" not in on.stats and on.stats["rounds"] > 0
    assert [x["token_ids"] for x in on.results] == plain[:2]


def test_drafting_off_decodes_plainly(lm_bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "b.eebundle"
    shutil.copytree(lm_bundle, dest)
    calibrate_speculative(dest, batches=(1,), thresholds=(0.3,), ks=(2,), tokens=4, prompts=PROMPTS,
                          min_speedup=1e9, threads=1, rounds=1)
    r = DecoderRunner(dest, threads=1)
    plain = [x["token_ids"] for x in r.generate(PROMPTS, 8).results]
    off = r.generate(PROMPTS, 8, mode="speculative")
    assert off.stats.get("drafting_off") is True and off.stats["rounds"] == 0
    assert [x["token_ids"] for x in off.results] == plain
    forced = r.generate(PROMPTS, 8, mode="speculative", thresholds="always")  # explicit settings win
    assert forced.stats["rounds"] > 0


def test_calibration_needs_a_grid(lm_bundle: Path) -> None:
    with pytest.raises(CalibrationError, match="at least one"):
        calibrate_speculative(lm_bundle, ks=())


def test_exit_calibration_certifies_a_disagreement_budget(lm_bundle: Path, tmp_path: Path) -> None:
    import numpy as np

    from eecompile.calibrate.search import evaluate
    from eecompile.decoder.calibrate import calibrate_exit, exit_table

    dest = tmp_path / "b.eebundle"
    shutil.copytree(lm_bundle, dest)
    prompts = [[i, (7 * i) % 128, (13 * i + 5) % 128] for i in range(1, 25)]
    runner = DecoderRunner(dest, threads=1)
    table = exit_table(runner, prompts, 12)
    assert table.n_samples == 24 * 12
    assert 0.0 < table.correct[0].mean() < 1.0 and table.correct[1].all()
    rec = calibrate_exit(dest, max_disagreement=0.2, delta=0.1, tokens=12, prompts=prompts, threads=1,
                         batches=(1,), rounds=2, min_speedup=0.0)
    assert rec["certified"] is True and rec["positions"] == 288
    assert set(rec["batches"]) == {"1"} and "off" not in rec["batches"]["1"]  # exits on at batch 1
    t = rec["thresholds"][0]
    assert isinstance(t, float) and 0.0 <= t <= 1.0
    # the certified threshold keeps the disagreement within the budget on the positions it was calibrated on,
    # and a looser one (every token exits) does not
    ev = evaluate(table, [t], [0.5, 1.0])
    assert ev.loss <= 0.2 + 0.05 and rec["exit_shares"][0] > 0.0
    assert evaluate(table, [0.0], [0.5, 1.0]).loss > 0.2
    # generate(mode="exit") without thresholds uses the certified ones
    r = DecoderRunner(dest, threads=1)
    used = r.generate(prompts[:4], 8, mode="exit")
    explicit = r.generate(prompts[:4], 8, mode="exit", thresholds=[t])
    assert [x["token_ids"] for x in used.results] == [x["token_ids"] for x in explicit.results]
    assert np.isclose(sum(used.exit_shares), 1.0)  # type: ignore[arg-type]
    assert Bundle.load(dest).manifest.decoder["calibration"]["exit"]["delta"] == 0.1  # type: ignore[index]


def test_exit_mode_off_where_it_does_not_pay_decodes_plainly(lm_bundle: Path, tmp_path: Path) -> None:
    from eecompile.decoder.calibrate import calibrate_exit

    dest = tmp_path / "b.eebundle"
    shutil.copytree(lm_bundle, dest)
    prompts = [[i, (7 * i) % 128, (13 * i + 5) % 128] for i in range(1, 25)]
    # a speedup exit mode cannot reach: the certified thresholds stay, exits are off at batch 1 and 2
    rec = calibrate_exit(dest, max_disagreement=0.2, delta=0.1, tokens=12, prompts=prompts, threads=1,
                         batches=(1, 2), rounds=1, min_speedup=1e9)
    assert rec["certified"] and all(e["off"] is True for e in rec["batches"].values())
    r = DecoderRunner(dest, threads=1)
    rows = prompts[:4]
    plain = [x["token_ids"] for x in r.generate(rows, 8, batch=2).results]
    off = r.generate(rows, 8, mode="exit", batch=2)
    assert off.stats.get("exits_off") is True and off.stats["exit_counts"][0] == 0
    assert [x["token_ids"] for x in off.results] == plain and off.exit_shares == [0.0, 1.0]
    # explicit thresholds win over the calibration: tokens exit again
    forced = r.generate(rows, 8, mode="exit", thresholds=rec["thresholds"], batch=2)
    assert "exits_off" not in forced.stats and forced.stats["exit_counts"][0] > 0


def test_exit_calibration_with_too_few_positions_is_refused(lm_bundle: Path, tmp_path: Path) -> None:
    from eecompile.decoder.calibrate import calibrate_exit

    dest = tmp_path / "b.eebundle"
    shutil.copytree(lm_bundle, dest)
    with pytest.raises(CalibrationError, match="test samples"):
        calibrate_exit(dest, max_disagreement=0.01, delta=0.01, tokens=2, prompts=PROMPTS, threads=1)
