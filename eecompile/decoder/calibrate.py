"""Calibrate speculative decoding per batch size: the draft-stop threshold and k with the highest measured tokens/s.

For each batch size, plain decoding and every (threshold, k) of a small grid generate the same continuations of
the same prompts; each configuration's speedup is its tokens/s over the plain tokens/s measured right before and
after it (their mean), so a drift in machine load is shared. The best configuration is kept if its speedup is at
least ``min_speedup``; otherwise that batch size is recorded as ``off`` and ``generate(mode="speculative")``
decodes plainly there (the output is the same token for token; only the speed differs).

``calibrate_exit`` sets exit-mode thresholds for a token-disagreement budget with the Learn-then-Test guarantee
of the single-pass calibration (``eecompile.calibrate.ltt``).

Results go to the bundle's ``decoder.calibration.speculative``: ``{batch: {threshold, draft_tokens, speedup, r, g}}``
or ``{batch: {off: true, speedup, r, g}}`` (r, g: ``measure_costs``, which the runtime's per-row drafting switch
uses); the runtime uses the entry of the largest calibrated batch size not above
the batch it runs (the smallest one when it runs below all of them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from eecompile.bundle import update_bundle
from eecompile.errors import CalibrationError
from eecompile.runtimes.lm import choice_for_batch

__all__ = ["calibrate_exit", "calibrate_speculative", "choice_for_batch", "exit_table"]

log = logging.getLogger(__name__)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are",
           "Once upon a time, in a small village,", "To make a cup of tea, first", "import numpy as np\n",
           "The theory of relativity says that", "Water boils at a temperature of"]


def measure_costs(runner: Any, batch: int, k: int, reps: int = 5) -> dict[str, float]:
    """Draft cost share r and verification cost ratio g at ``batch`` rows with 48 cached positions.

    r: one draft step (the segments up to exit 0 + its draft head, one position) over one plain step (every
    segment + the head); g: one verification of k + 1 positions (the remaining segments + the head) over one
    plain step. Medians of ``reps`` timed calls each; also ``plain_step_ms``."""
    import statistics
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    ex = runner.exits[0]
    last = len(runner.segments) - 1

    def rows(n_new: int) -> list[Any]:
        rs = runner._new_rows([list(rng.integers(0, runner.vocab, 48 + n_new)) for _ in range(batch)])
        for r in rs:
            r.seq = r.seq[:48]
        runner._stack(rs, 0, last)
        for r, full in zip(rs, [list(rng.integers(0, runner.vocab, 48 + n_new)) for _ in rs], strict=True):
            r.seq = r.seq + full[48:]
        return rs

    def timed(n_new: int, fn: Any) -> float:
        ts = []
        for _ in range(reps):
            rs = rows(n_new)  # fresh rows with 48 cached positions (not timed)
            t = time.perf_counter()
            fn(rs)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def plain(rs: list[Any]) -> None:
        out = runner._stack(rs, 0, last)
        runner._run_head(np.stack([o[-1:] for o in out]), 2.0, False)

    def draft(rs: list[Any]) -> None:
        out = runner._stack(rs, 0, ex["segment"])
        runner._exit_head(0, np.stack([o[-1:] for o in out]), 2.0, False)

    def verify(rs: list[Any]) -> None:
        out = runner._stack(rs, ex["segment"] + 1, last)
        runner._run_head(np.stack(out), 2.0, False)

    def verify_rows(n_new: int) -> list[Any]:
        rs = rows(n_new)
        runner._stack(rs, 0, ex["segment"])  # the drafted positions' exit states, as drafting leaves them
        return rs

    t_plain = timed(1, plain)
    t_draft = timed(1, draft)
    vs = []
    for _ in range(reps):
        rs = verify_rows(k + 1)
        t = time.perf_counter()
        verify(rs)
        vs.append(time.perf_counter() - t)
    return {"r": t_draft / t_plain, "g": statistics.median(vs) / t_plain, "plain_step_ms": 1e3 * t_plain,
            "k": k}


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
        costs = measure_costs(runner, b, int(best["draft_tokens"]), reps=3)
        rg = {"r": costs["r"], "g": costs["g"]}  # for the runtime's per-row drafting switch
        if best["speedup"] >= min_speedup:
            table[str(b)] = {"threshold": best["threshold"], "draft_tokens": best["draft_tokens"],
                             "speedup": best["speedup"], **rg}
        else:
            table[str(b)] = {"off": True, "speedup": best["speedup"], **rg}
        log.info("batch %d: %s (grid %s)", b, table[str(b)], tried)

    _write_calibration(bundle_path, "speculative", table)
    return table



def exit_table(runner: Any, prompts: list[Any], tokens: int) -> Any:
    """The calibration table of exit mode: one sample per generated position of the full model's own greedy
    continuations of ``prompts``. ``scores[e, n]``: exit e's draft max-prob at position n (given the full model's
    prefix); ``correct[e, n]``: its top-1 equals the full model's (the final row is all True)."""
    import numpy as np

    from eecompile.calibrate.collect import ExitTable

    gen = runner.generate(prompts, tokens, mode="none", calibrated=False)
    n_exits = len(runner.exits)
    scores: list[list[np.ndarray]] = [[] for _ in range(n_exits)]
    agree: list[list[np.ndarray]] = [[] for _ in range(n_exits)]
    last = len(runner.segments) - 1
    for p, res in zip(prompts, gen.results, strict=True):
        ids = (runner._encode(p) if isinstance(p, str) else [int(t) for t in p]) + list(res["token_ids"])
        n_prompt = len(ids) - len(res["token_ids"])
        where = np.arange(n_prompt - 1, len(ids) - 1)  # the positions that predict the generated tokens
        if not len(where):
            continue
        row = runner._new_row(0, ids)
        hs = []
        first = 0
        for ex in runner.exits:
            runner._stack([row], first, ex["segment"])
            hs.append(np.stack(row.pending[ex["segment"] + 1]))  # the exit's hidden states, every position
            first = ex["segment"] + 1
        out = runner._stack([row], first, last)[0]
        final = runner._run_head(out[None, where], 2.0, False)["token"][0]
        for e in range(n_exits):
            head = runner._exit_head(e, hs[e][None, where], 2.0, False)
            scores[e].append(head["max_prob"][0])
            agree[e].append(head["token"][0] == final)
    if not scores or not scores[0]:
        raise CalibrationError("exit calibration: no generated positions; give prompts and tokens > 0")
    s = np.stack([np.concatenate(x) for x in scores])
    c = np.vstack([np.stack([np.concatenate(x) for x in agree]), np.ones((1, s.shape[1]), bool)])
    return ExitTable(scores=s, correct=c, fires_above=[True] * n_exits)


def calibrate_exit(bundle_path: str | Path, *, max_disagreement: float = 0.05, delta: float = 0.1,
                   tokens: int = 64, prompts: list[Any] | None = None, threads: int | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Exit-mode thresholds by Learn-then-Test (``eecompile.calibrate.ltt``), written into the bundle.

    The loss of a position is "the token emitted (at the first exit whose gate fires, else the final head)
    differs from the full model's top-1 given the same prefix"; LTT certifies thresholds with
    P(loss rate on new positions <= ``max_disagreement``) >= 1 - ``delta``, choosing the cheapest certified one
    (cost: layers run). Caveats, in the record: the samples are positions of a few continuations, which are
    not independent, and the guarantee is per token given the full model's prefix (in exit mode, once a token
    differs, the continuation itself differs from mode none). Nothing certified: every exit set to "never".

    Writes ``decoder.calibration.exit``: ``{thresholds, certified, max_disagreement, delta, positions,
    test_disagreement, exit_shares, calibration_disagreement, expected_cost}`` (shares, disagreement and cost on
    all calibration positions); ``generate(mode="exit")`` without thresholds uses it. Raises
    ``CalibrationError`` (no exits; too few positions for the budget; see ``ltt_thresholds``).
    """
    import numpy as np

    from eecompile.calibrate.ltt import ltt_thresholds
    from eecompile.calibrate.search import evaluate
    from eecompile.runtimes.lm import DecoderRunner

    runner = DecoderRunner(bundle_path, threads=threads)
    if not runner.exits:
        raise CalibrationError(f"{bundle_path}: the decoder bundle has no exits to calibrate")
    rows: list[Any] = list(prompts) if prompts is not None else list(PROMPTS)
    table = exit_table(runner, rows, tokens)
    n_layers = int(runner.dec["layers"])
    costs = [(ex["after_layer"] + 1) / n_layers for ex in runner.exits] + [1.0]
    res = ltt_thresholds(table, costs, max_disagreement, delta, seed=seed)
    thr = [float(t) if np.isfinite(t) else "never" for t in res.thresholds]
    ev = evaluate(table, res.thresholds, costs)
    record = {"thresholds": thr, "certified": bool(res.certified), "max_disagreement": max_disagreement,
              "delta": delta, "positions": int(table.n_samples), "test_disagreement": res.test_loss,
              "exit_shares": [float(x) for x in ev.shares], "calibration_disagreement": float(ev.loss),
              "expected_cost": float(ev.expected_cost)}
    log.info("exit calibration: %s", record)

    _write_calibration(bundle_path, "exit", record)
    return record


def _write_calibration(bundle_path: str | Path, mode: str, record: dict[str, Any]) -> None:
    """Store ``record`` as the decoder bundle's calibration for ``mode`` (atomic rewrite, other modes kept)."""

    def change(tmp: Path, manifest: Any) -> None:
        cal = dict(manifest.decoder.get("calibration") or {})
        cal[mode] = record
        manifest.decoder["calibration"] = cal

    update_bundle(bundle_path, change)
