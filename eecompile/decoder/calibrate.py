"""Calibrate speculative decoding per batch size: the draft-stop threshold and k with the highest measured tokens/s.

For each batch size, plain decoding and every (threshold, k) of a small grid generate the same continuations of
the same prompts; each configuration's speedup is its tokens/s over the plain tokens/s measured right before and
after it (their mean), so a drift in machine load is shared. The best configuration is kept if its speedup is at
least ``min_speedup``; otherwise that batch size is recorded as ``off`` and ``generate(mode="speculative")``
decodes plainly there (the output is the same token for token; only the speed differs).

Results go to the bundle's ``decoder.calibration.speculative``: ``{batch: {threshold, draft_tokens, speedup}}``
or ``{batch: {off: true, speedup}}``; the runtime uses the entry of the largest calibrated batch size not above
the batch it runs (the smallest one when it runs below all of them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from eecompile.bundle import update_bundle
from eecompile.errors import CalibrationError
from eecompile.runtimes.lm import choice_for_batch

__all__ = ["calibrate_speculative", "choice_for_batch"]

log = logging.getLogger(__name__)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are",
           "Once upon a time, in a small village,", "To make a cup of tea, first", "import numpy as np\n",
           "The theory of relativity says that", "Water boils at a temperature of"]


def calibrate_speculative(bundle_path: str | Path, *, batches: tuple[int, ...] = (1, 4, 8),
                          thresholds: tuple[float, ...] = (0.3, 0.5, 0.7), ks: tuple[int, ...] = (2, 4, 6),
                          tokens: int = 32, prompts: list[Any] | None = None,
                          min_speedup: float = 1.0, threads: int | None = None) -> dict[str, Any]:
    """Measure the grid at each batch size, write the choice into the bundle, and return it.

    Raises ``CalibrationError`` when the bundle has no exits or a grid is empty.
    """
    from eecompile.runtimes.lm import DecoderRunner

    runner = DecoderRunner(bundle_path, threads=threads)
    if not runner.exits:
        raise CalibrationError(f"{bundle_path}: the decoder bundle has no exits to calibrate")
    if not thresholds or not ks or not batches:
        raise CalibrationError("calibrate: give at least one batch size, threshold and k")
    rows_all: list[Any] = list(prompts) if prompts is not None else list(PROMPTS)
    table: dict[str, Any] = {}
    for b in batches:
        rows: list[Any] = [rows_all[i % len(rows_all)] for i in range(max(b, 2))]
        runner.generate(rows[:b], 2, mode="none", batch=b)  # warm-up

        def plain() -> float:
            return runner.generate(rows, tokens, mode="none", batch=b).tokens_per_s  # noqa: B023

        before = plain()
        best: dict[str, Any] | None = None
        tried = []
        for t in thresholds:
            for k in ks:
                got = runner.generate(rows, tokens, mode="speculative", thresholds=t, draft_tokens=k, batch=b,
                                      calibrated=False)
                after = plain()
                speedup = got.tokens_per_s / ((before + after) / 2)
                before = after
                tried.append({"threshold": t, "draft_tokens": k, "speedup": speedup,
                              "acceptance_rate": got.acceptance_rate})
                if best is None or speedup > best["speedup"]:
                    best = tried[-1]
        assert best is not None
        if best["speedup"] >= min_speedup:
            table[str(b)] = {"threshold": best["threshold"], "draft_tokens": best["draft_tokens"],
                             "speedup": best["speedup"]}
        else:
            table[str(b)] = {"off": True, "speedup": best["speedup"]}
        log.info("batch %d: %s (grid %s)", b, table[str(b)], tried)

    def change(tmp: Path, manifest: Any) -> None:
        cal = dict(manifest.decoder.get("calibration") or {})
        cal["speculative"] = table
        manifest.decoder["calibration"] = cal

    update_bundle(bundle_path, change)
    return table

