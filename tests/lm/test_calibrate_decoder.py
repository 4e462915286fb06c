"""Speculative calibration per batch size: the measured best (threshold, k), or drafting off where it does not pay."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from eecompile.bundle import Bundle
from eecompile.decoder.calibrate import calibrate_speculative, choice_for_batch
from eecompile.errors import CalibrationError
from eecompile.runtimes.lm import DecoderRunner

PROMPTS = [[5, 17, 33], [90, 2, 41, 7], [11], [3, 1, 4, 1, 5]]


def test_choice_for_batch_takes_the_largest_calibrated_size_not_above() -> None:
    cal = {"speculative": {"1": {"threshold": 0.5, "draft_tokens": 4}, "4": {"off": True}}}
    assert choice_for_batch(cal, 1)["threshold"] == 0.5  # type: ignore[index]
    assert choice_for_batch(cal, 3)["threshold"] == 0.5  # type: ignore[index]
    assert choice_for_batch(cal, 8)["off"] is True  # type: ignore[index]
    assert choice_for_batch(None, 2) is None


def test_calibration_is_written_and_used(lm_bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "b.eebundle"
    shutil.copytree(lm_bundle, dest)
    # a speedup no configuration reaches: drafting is switched off at batch 1, on at batch 2
    table = calibrate_speculative(dest, batches=(1,), thresholds=(0.3,), ks=(2,), tokens=6, prompts=PROMPTS,
                                  min_speedup=1e9, threads=1)
    assert table["1"]["off"] is True
    table2 = calibrate_speculative(dest, batches=(2,), thresholds=(0.0, 0.3), ks=(2, 3), tokens=6, prompts=PROMPTS,
                                   min_speedup=0.0, threads=1)
    assert table2["2"]["threshold"] in (0.0, 0.3) and table2["2"]["draft_tokens"] in (2, 3)
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
                          min_speedup=1e9, threads=1)
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
