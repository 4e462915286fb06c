"""Calibrate LM decoding per batch size: speculative mode's draft-stop threshold and k with the highest measured
tokens/s, exit mode's thresholds for a token-disagreement budget; either switched off where it does not pay.

Speed is measured in interleaved paired rounds (``interleaved``): plain decoding and the mode generate the same
continuations of the same prompts, as plain, mode, plain, mode, ..., plain; each mode run's ratio is its tokens/s
over the mean of the plain runs right before and after it, so a drift in machine load is shared. The decision
(``speed_decision``) takes the median of ``rounds`` such ratios as the speedup and keeps the mode on only if that
median reaches ``min_speedup`` and the lower quartile of the ratios reaches ``min(1, min_speedup)``: one lucky
round cannot switch it on.

Speculative: for each batch size every (threshold, k) of a small grid is screened with one paired round, then the
best is measured in ``rounds`` paired rounds and decided on; ``off`` makes ``generate(mode="speculative")``
decode plainly there (the output is the same token for token; only the speed differs).

``calibrate_exit`` sets exit-mode thresholds for a token-disagreement budget with the Learn-then-Test guarantee
of the single-pass calibration (``eecompile.calibrate.ltt``), then measures exit mode at those thresholds
against plain decoding at each batch size in the same way; ``off`` makes ``generate(mode="exit")`` decode
plainly there (closer to the full model, so the guarantee still holds).

Results go to the bundle's ``decoder.calibration.speculative``: ``{batch: {threshold, draft_tokens, speedup, r, g,
...}}`` or ``{batch: {off: true, speedup, r, g, ...}}`` (r, g: ``measure_costs``, which the runtime's per-row
drafting switch uses), and ``decoder.calibration.exit``: ``{thresholds, certified, ..., batches: {batch:
{speedup, ...} or {off: true, speedup, ...}}}``; the runtime uses the entry of the largest calibrated batch size
not above the batch it runs (the smallest one when it runs below all of them; ``choice_for_batch``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eecompile.bundle import update_bundle
from eecompile.errors import CalibrationError, DataError
from eecompile.runtimes.lm import choice_for_batch

__all__ = ["calibrate_exit", "calibrate_speculative", "check_prompts_fit", "choice_for_batch", "default_prompts",
           "exit_report", "exit_table", "interleaved", "read_prompts", "speculative_report", "speed_decision"]

log = logging.getLogger(__name__)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are",
           "Once upon a time, in a small village,", "To make a cup of tea, first", "import numpy as np\n",
           "The theory of relativity says that", "Water boils at a temperature of"]
DEFAULT_EXIT_PROMPTS = 24  # exit mode: 24 prompts x 64 tokens = 1536 positions (LTT at 5%, delta 0.05 needs 59 test ones)
ROUNDS = 5  # paired rounds of the speed decision (per batch size)
SPEED_TOKENS = 32  # exit mode: new tokens per row in its speed rounds


def default_prompts(n: int = len(PROMPTS)) -> list[str]:
    """``n`` calibration prompts available offline: ``PROMPTS``, then the opening words (8) of the pydoc topics
    that ship with Python, taken from the topics ``eecompile.decoder.train.default_corpus`` does not train on
    (the last in sorted order), so calibration text is not the draft heads' training text."""
    from pydoc_data.topics import topics

    from eecompile.decoder.train import default_corpus

    out = list(PROMPTS[:n])
    held_out = sorted(topics)[len(default_corpus()):]
    for key in reversed(held_out):
        if len(out) >= n:
            break
        para = next((q for q in topics[key].strip().split("\n\n")  # prose, not a title, grammar rule or table
                     if q[:1].isupper() and len(q.split()) >= 8 and "::=" not in q and "***" not in q
                     and "+--" not in q), None)
        if para is not None:
            out.append(" ".join(para.split()[:8]))
    return out


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per non-blank line (``\\n`` in a line stands for a newline).

    Raises ``DataError`` naming the file when it cannot be read or holds no prompt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: prompts file not found; give a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the prompts ({e}); give a UTF-8 text file, one prompt per line") from e
    prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (every line is blank); give one prompt per line")
    return prompts


def interleaved(plain: Callable[[], float], runs: Sequence[Callable[[], float]]) -> dict[str, list[float]]:
    """Time ``runs`` interleaved with plain decoding: plain, run 0, plain, run 1, ..., plain.

    Each callable decodes and returns its tokens/s. ``ratios[i]``: run i's tokens/s over the mean of the plain
    tokens/s right before and after it (a paired comparison: a drift in machine load is shared). Returns
    ``{"ratios", "tokens_per_s" (the runs'), "plain" (the len(runs) + 1 plain runs')}``."""
    before = plain()
    out: dict[str, list[float]] = {"ratios": [], "tokens_per_s": [], "plain": [before]}
    for run in runs:
        got = run()
        after = plain()
        out["ratios"].append(got / ((before + after) / 2))
        out["tokens_per_s"].append(got)
        out["plain"].append(after)
        before = after
    return out


def speed_decision(ratios: Sequence[float], min_speedup: float) -> dict[str, Any]:
    """Whether a mode pays, from its paired-round speed ratios (``interleaved``).

    ``speedup``: the median ratio; ``speedup_q1``: the lower quartile (``numpy.percentile`` 25, linear); ``on``:
    median >= ``min_speedup`` and lower quartile >= min(1, ``min_speedup``) (with 5 rounds: 4 of them at least
    as fast as plain decoding). Raises ``CalibrationError`` for no ratios."""
    import numpy as np

    if not ratios:
        raise CalibrationError("calibrate: no timed rounds; give rounds >= 1")
    med = float(np.median(ratios))
    q1 = float(np.percentile(ratios, 25))
    return {"on": med >= min_speedup and q1 >= min(1.0, min_speedup), "speedup": med, "speedup_q1": q1,
            "speedup_rounds": [float(x) for x in ratios]}


def _median(xs: Sequence[float]) -> float:
    return float(sorted(xs)[len(xs) // 2])


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
        out = runner._stack(rs, 0, last)
        runner._adapt(0, rs, out)  # an attention adapter's cache holds the 48 positions too
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
        out = runner._adapt(0, rs, runner._stack(rs, 0, ex["segment"]))
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


def check_prompts_fit(runner: Any, prompts: list[Any], tokens: int, what: str | None = None) -> None:
    """Raise ``CalibrationError`` naming the prompt (its number and opening words) and ``what`` (default
    ``--tokens N``) when a calibration prompt with ``tokens`` new tokens does not fit the bundle's cache
    (``max_length`` positions); checked before anything is measured (``generate`` would name ``max_new_tokens``,
    and a warm-up call's count)."""
    fix = "give shorter prompts (--prompts FILE)" if what else "lower --tokens, give shorter prompts (--prompts FILE)"
    what = what or f"--tokens {tokens}"
    for i, p in enumerate(prompts):
        n = len(runner._encode(p) if isinstance(p, str) else list(p))
        if n + tokens > runner.max_length:
            shown = repr(p[:40] + ("..." if len(p) > 40 else "")) if isinstance(p, str) else f"{n} token ids"
            raise CalibrationError(f"calibration prompt {i + 1} ({shown}): {n} tokens + {what} exceed the cache "
                                   f"({runner.max_length} positions); {fix}, or recompile with a larger max_length")


def calibrate_speculative(bundle_path: str | Path, *, batches: tuple[int, ...] = (1, 4, 8),
                          thresholds: tuple[float, ...] = (0.3, 0.5, 0.7), ks: tuple[int, ...] = (2, 4, 6),
                          tokens: int = 32, prompts: list[Any] | None = None,
                          min_speedup: float = 1.0, threads: int | None = None, rounds: int = ROUNDS) -> dict[str, Any]:
    """Measure the grid at each batch size, write the choice into the bundle (atomically), and return it.

    ``batches``: batch sizes (rows decoded together); ``thresholds`` and ``ks``: the grid of draft-stop max-prob
    thresholds and most tokens drafted per verification (k); ``tokens``: new tokens per prompt; ``prompts``: text
    or token ids (default ``PROMPTS``), cycled to ``max(batch, 2)`` rows. Every grid point is screened in one
    paired round, the best one is timed in ``rounds`` more and kept by ``speed_decision`` (median speedup >=
    ``min_speedup``, lower quartile >= min(1, ``min_speedup``)), else the batch size is ``off``. Each entry of the
    returned ``{str(batch): entry}`` holds the choice (``threshold`` and ``draft_tokens``, or ``off``), its
    ``speedup`` (median tokens/s over plain decoding's), ``speedup_q1`` and ``speedup_rounds``,
    ``acceptance_rate``, ``plain_tokens_per_s``, r and g, and the screening ``grid``. Raises
    ``CalibrationError`` when the bundle has no exits, a grid is empty or invalid, or ``rounds`` < 1.
    """
    from eecompile.runtimes.lm import DecoderRunner

    runner = DecoderRunner(bundle_path, threads=threads)
    if not runner.exits:
        raise CalibrationError(f"{bundle_path}: the decoder bundle has no exits to calibrate")
    if not thresholds or not ks or not batches:
        raise CalibrationError("calibrate: give at least one batch size, threshold and k")
    bad = ([f"batch {b}" for b in batches if isinstance(b, bool) or not isinstance(b, int) or b < 1]
           + [f"threshold {t}" for t in thresholds if not 0.0 <= t <= 1.0]
           + [f"k {k}" for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
           + ([f"rounds {rounds}"] if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1 else []))
    if bad:
        raise CalibrationError(f"calibrate: {', '.join(bad)}: batch sizes, k and rounds are integers >= 1, "
                               f"thresholds max-probs in [0, 1]")
    rows_all: list[Any] = list(prompts) if prompts is not None else list(PROMPTS)
    check_prompts_fit(runner, rows_all, tokens)
    table: dict[str, Any] = {}
    for b in batches:
        plain, rows = _plain_runs(runner, rows_all, b, tokens)
        grid = [(float(t), int(k)) for t in thresholds for k in ks]
        found: dict[tuple[float, int], Any] = {}

        def run(t: float, k: int, rows: list[Any] = rows, b: int = b,
                found: dict[tuple[float, int], Any] = found) -> Callable[[], float]:
            thr = [t if j == 0 else "never" for j in range(len(runner.exits))]  # exit 0 drafts

            def go() -> float:
                got = runner.generate(rows, tokens, mode="speculative", thresholds=thr, draft_tokens=k, batch=b,
                                      calibrated=False)
                found[(t, k)] = got
                return float(got.tokens_per_s)
            return go

        screen = interleaved(plain, [run(t, k) for t, k in grid])
        tried = [{"threshold": t, "draft_tokens": k, "speedup": ratio, "tokens_per_s": tps,
                  "acceptance_rate": found[(t, k)].acceptance_rate,
                  "mean_accepted_length": found[(t, k)].mean_accepted_length}
                 for (t, k), ratio, tps in zip(grid, screen["ratios"], screen["tokens_per_s"], strict=True)]
        best = max(tried, key=lambda x: x["speedup"])
        timed = interleaved(plain, [run(best["threshold"], best["draft_tokens"])] * rounds)
        decision = speed_decision(timed["ratios"], min_speedup)
        costs = measure_costs(runner, b, int(best["draft_tokens"]), reps=3)
        common = {"speedup": decision["speedup"], "speedup_q1": decision["speedup_q1"],
                  "speedup_rounds": decision["speedup_rounds"], "acceptance_rate": best["acceptance_rate"],
                  "plain_tokens_per_s": _median(screen["plain"] + timed["plain"]),
                  "r": costs["r"], "g": costs["g"],  # for the runtime's per-row drafting switch
                  "grid": tried}
        if decision["on"]:
            table[str(b)] = {"threshold": best["threshold"], "draft_tokens": best["draft_tokens"], **common}
        else:
            table[str(b)] = {"off": True, "threshold_tried": best["threshold"],
                             "draft_tokens_tried": best["draft_tokens"], **common}
        log.info("batch %d: %s", b, table[str(b)])

    _write_calibration(bundle_path, "speculative", table)
    return table


def _plain_runs(runner: Any, rows_all: list[Any], b: int, tokens: int) -> tuple[Callable[[], float], list[Any]]:
    """The rows of batch size ``b`` (``rows_all`` cycled to ``max(b, 2)``, so rows also join as others finish)
    and a callable decoding them plainly (tokens/s), after one warm-up call."""
    rows = [rows_all[i % len(rows_all)] for i in range(max(b, 2))]
    runner.generate(rows[:b], 2, mode="none", batch=b)  # warm-up

    def plain() -> float:
        return float(runner.generate(rows, tokens, mode="none", batch=b).tokens_per_s)
    return plain, rows


def exit_speed(runner: Any, thresholds: list[Any], *, batches: Sequence[int], prompts: list[Any],
               tokens: int = SPEED_TOKENS, rounds: int = ROUNDS, min_speedup: float = 1.0) -> dict[str, Any]:
    """Exit mode at ``thresholds`` against plain decoding at each batch size: ``rounds`` interleaved paired
    rounds of ``tokens`` new tokens per row (``prompts`` cycled to ``max(batch, 2)`` rows), decided by
    ``speed_decision``. Returns ``{str(batch): {speedup, speedup_q1, speedup_rounds, plain_tokens_per_s,
    exit_shares}}``, with ``off: true`` where exit mode does not pay."""
    out: dict[str, Any] = {}
    for b in batches:
        plain, rows = _plain_runs(runner, prompts, b, tokens)
        shares: list[Any] = []

        def run(rows: list[Any] = rows, b: int = b, shares: list[Any] = shares) -> float:
            got = runner.generate(rows, tokens, mode="exit", thresholds=thresholds, batch=b, calibrated=False)
            shares.append(got.exit_shares)
            return float(got.tokens_per_s)

        timed = interleaved(plain, [run] * rounds)
        decision = speed_decision(timed["ratios"], min_speedup)
        entry = {"speedup": decision["speedup"], "speedup_q1": decision["speedup_q1"],
                 "speedup_rounds": decision["speedup_rounds"], "plain_tokens_per_s": _median(timed["plain"]),
                 "exit_shares": [float(x) for x in shares[-1]]}
        out[str(b)] = entry if decision["on"] else {"off": True, **entry}
        log.info("exit mode, batch %d: %s", b, out[str(b)])
    return out


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
        for e, ex in enumerate(runner.exits):
            runner._stack([row], first, ex["segment"])
            # the exit's hidden states at every position (after its attention adapter, when it has one)
            hs.append(runner._adapt(e, [row], [np.stack(row.pending[ex["segment"] + 1])])[0])
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
                   seed: int = 0, require_certified: bool = False, batches: Sequence[int] = (1, 4, 8),
                   min_speedup: float = 1.0, rounds: int = ROUNDS) -> dict[str, Any]:
    """Exit-mode thresholds by Learn-then-Test (``eecompile.calibrate.ltt``), written into the bundle.

    The loss of a position is "the token emitted (at the first exit whose gate fires, else the final head)
    differs from the full model's top-1 given the same prefix"; LTT certifies thresholds with
    P(loss rate on new positions <= ``max_disagreement``) >= 1 - ``delta``, choosing the cheapest certified one
    (cost: layers run). Caveats, in the record: the samples are positions of a few continuations, which are
    not independent, and the guarantee is per token given the full model's prefix (in exit mode, once a token
    differs, the continuation itself differs from mode none). Nothing certified: every exit set to "never", or,
    with ``require_certified``, ``CalibrationError`` and the bundle left as it was. ``prompts``: text or token
    ids (default: ``default_prompts(DEFAULT_EXIT_PROMPTS)``); ``tokens``: the continuation's length.

    Then, when some exit can fire, exit mode at the certified thresholds is timed against plain decoding at each
    of ``batches`` (``exit_speed``: ``rounds`` paired rounds of ``SPEED_TOKENS`` tokens per row on the same
    prompts) and switched ``off`` at a batch size where it does not reach ``min_speedup`` (``speed_decision``);
    off decodes plainly, so the disagreement guarantee still holds there.

    Writes ``decoder.calibration.exit``: ``{thresholds, certified, max_disagreement, delta, positions,
    test_disagreement, exit_shares, calibration_disagreement, expected_cost, batches}`` (shares, disagreement and
    cost on all calibration positions; ``batches``: ``exit_speed``'s entries, absent when nothing can exit);
    ``generate(mode="exit")`` without thresholds uses it. Raises ``CalibrationError`` (no exits; too few
    positions for the budget; see ``ltt_thresholds``; a bad batch size or ``rounds``).
    """
    import numpy as np

    from eecompile.calibrate.ltt import ltt_thresholds
    from eecompile.calibrate.search import evaluate
    from eecompile.runtimes.lm import DecoderRunner

    runner = DecoderRunner(bundle_path, threads=threads)
    if not runner.exits:
        raise CalibrationError(f"{bundle_path}: the decoder bundle has no exits to calibrate")
    bad = ([f"batch {b}" for b in batches if isinstance(b, bool) or not isinstance(b, int) or b < 1]
           + ([f"rounds {rounds}"] if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1 else []))
    if bad or not batches:
        raise CalibrationError(f"calibrate: {', '.join(bad) or 'no batch size'}: give batch sizes and rounds, "
                               f"integers >= 1")
    rows: list[Any] = list(prompts) if prompts is not None else default_prompts(DEFAULT_EXIT_PROMPTS)
    check_prompts_fit(runner, rows, tokens)
    check_prompts_fit(runner, rows, SPEED_TOKENS, f"the {SPEED_TOKENS} new tokens of the speed rounds")
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
    if res.certified and any(t != "never" for t in thr):
        record["batches"] = exit_speed(runner, thr, batches=batches, prompts=rows, rounds=rounds,
                                       min_speedup=min_speedup)
    if require_certified and not res.certified:
        raise CalibrationError(
            f"{bundle_path}: no exit thresholds certify a token disagreement <= {max_disagreement:g} at confidence "
            f"{1 - delta:g} on {table.n_samples} positions (the exits disagree with the final layer on "
            f"{1 - float(table.correct[0].mean()):.0%} of them); the bundle is unchanged. Train the draft heads "
            f"(eecompile train-heads), allow a larger --max-disagreement, or give more prompts or tokens")

    _write_calibration(bundle_path, "exit", record)
    return record


def _speed_cells(e: dict[str, Any]) -> str:
    """A per-batch entry's median speedup and lower quartile over its paired rounds (entries written before the
    paired rounds have no quartile: '-')."""
    q1 = e.get("speedup_q1")
    return f"{e['speedup']:>6.2f}x  {'-' if q1 is None else f'{q1:.2f}x':>6}"


def speculative_report(table: dict[str, Any]) -> list[str]:
    """The lines of ``calibrate_speculative``'s table: one row per batch size, the choice and what it measured."""
    out = ["batch  drafting       speedup      q1  acceptance  tokens/verif.  plain tok/s      r      g",
           "-----  -------------  -------  ------  ----------  -------------  -----------  -----  -----"]
    for b, e in sorted(table.items(), key=lambda kv: int(kv[0])):
        best = max(e["grid"], key=lambda x: x["speedup"]) if e.get("grid") else {}
        what = "off" if e.get("off") else f"t={e['threshold']:g} k={e['draft_tokens']}"
        acc = e.get("acceptance_rate")
        mal = best.get("mean_accepted_length")
        out.append(f"{int(b):>5}  {what:<13}  {_speed_cells(e)}  {'-' if acc is None else f'{acc:.1%}':>10}  "
                   f"{'-' if mal is None else f'{mal:.2f}':>13}  {e.get('plain_tokens_per_s', float('nan')):>11.1f}  "
                   f"{e['r']:>5.2f}  {e['g']:>5.2f}")
    out.append("(speedup: the median over paired rounds against plain decoding of the best (threshold, k) of the "
               "grid, q1 their lower quartile; off: the median did not reach the minimum speedup or the lower "
               "quartile was below min(1, minimum), so speculative mode decodes plainly at that batch size)")
    return out


def exit_report(record: dict[str, Any], after_layers: list[int]) -> list[str]:
    """The lines of ``calibrate_exit``'s record: per exit its threshold and share of tokens, the budget, then per
    batch size whether exits are on and the speedup measured."""
    out = ["exit            threshold  tokens", "--------------  ---------  ------"]
    for k, (t, share) in enumerate(zip(record["thresholds"], record["exit_shares"], strict=False)):
        out.append(f"{'after layer ' + str(after_layers[k]):<14}  {t if isinstance(t, str) else f'{t:.4f}':>9}  "
                   f"{share:>6.1%}")
    out.append(f"{'final':<14}  {'':>9}  {record['exit_shares'][-1]:>6.1%}")
    state = "certified" if record["certified"] else "NOT certified (every exit set to never)"
    test = record.get("test_disagreement")
    out.append(f"{state}: token disagreement <= {record['max_disagreement']:g} with probability >= "
               f"{1 - record['delta']:g} (Learn-then-Test on {record['positions']} positions; disagreement "
               f"{record['calibration_disagreement']:.1%} on all of them"
               + ("" if test is None else f", {test:.1%} on the test split") + "; expected cost "
               f"{record['expected_cost']:.2f} of the full model's layers)")
    batches = record.get("batches") or {}
    if batches:
        out += ["", "batch  exits     speedup      q1  exited  plain tok/s",
                "-----  --------  -------  ------  ------  -----------"]
        for b, e in sorted(batches.items(), key=lambda kv: int(kv[0])):
            exited = 1.0 - e["exit_shares"][-1] if e.get("exit_shares") else float("nan")
            out.append(f"{int(b):>5}  {'off' if e.get('off') else 'exits on':<8}  {_speed_cells(e)}  "
                       f"{exited:>6.1%}  {e['plain_tokens_per_s']:>11.1f}")
        out.append("(speedup: exit mode at these thresholds over plain decoding, the median over paired rounds, q1 "
                   "their lower quartile; off: exit mode decodes plainly at that batch size, as it did not pay)")
    return out


def _write_calibration(bundle_path: str | Path, mode: str, record: dict[str, Any]) -> None:
    """Store ``record`` as the decoder bundle's calibration for ``mode`` (atomic rewrite, other modes kept)."""

    def change(tmp: Path, manifest: Any) -> None:
        cal = dict(manifest.decoder.get("calibration") or {})
        cal[mode] = record
        manifest.decoder["calibration"] = cal

    update_bundle(bundle_path, change)
