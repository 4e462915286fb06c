"""``python -m benchmarks.lm_exit_fill [--bundle B] [--batches 1 4] [--tokens 32] [--rounds 2] [--thresholds T ...]``.

Exit mode's two ways to give the layers a token skipped its keys/values, on the same bundle and prompts:
``later`` (the exit state runs through the deep layers with the next token that goes deep) and ``propagate``
(CALM's state propagation: each deep layer's key/value projections of the exit state, at once). Per batch size
and exit threshold: tokens/s over ``none``'s in the same round (modes interleaved, order reversed every other
round; medians with min-max), token agreement with ``none``, the full model's perplexity of the generated text
(median over prompts) and the exit shares. Writes ``benchmarks/results/lm_exit_fill.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lm_decoding import DEFAULT_BUNDLE, HERE, PROMPTS, _median, _perplexity

FILLS = ("later", "propagate")


def run(bundle: Path, batches: list[int], tokens: int, rounds: int, thresholds: list[Any],
        threads: int | None) -> dict[str, Any]:
    from eecompile.runtimes.lm import DecoderRunner

    runner = DecoderRunner(bundle, threads=threads)
    tok = runner.tokenizer() if runner._has_tokenizer() else None
    prompts: list[Any] = list(PROMPTS) if tok is not None else [[5 + i, 17 * i % 97, 33] for i in range(16)]
    out: dict[str, Any] = {"bundle": bundle.name, "tokens": tokens, "rounds": rounds, "threads": threads, "runs": []}
    for b in batches:
        rows = [prompts[i % len(prompts)] for i in range(2 * b)]
        ids = [list(tok.encode(p).ids) if tok is not None else list(p) for p in rows]
        runner.generate(rows[:b], 2, batch=b)  # warm-up
        for thr in thresholds:
            tps: dict[str, list[float]] = {m: [] for m in ("none", *FILLS)}
            last: dict[str, Any] = {}
            for rnd in range(rounds):
                order = ["none", *FILLS]
                for m in (order if rnd % 2 == 0 else order[::-1]):
                    kw = {"mode": "none"} if m == "none" else {"mode": "exit", "thresholds": thr, "exit_fill": m}
                    last[m] = runner.generate(rows, tokens, batch=b, calibrated=False, **kw)  # type: ignore[arg-type]
                    tps[m].append(last[m].tokens_per_s)
            plain = [r["token_ids"] for r in last["none"].results]
            entry: dict[str, Any] = {"batch": b, "threshold": thr, "none_tokens_per_s": _median(tps["none"]),
                                     "perplexity_none": statistics.median(
                                         _perplexity(runner, i, p) for i, p in zip(ids, plain, strict=True))}
            for m in FILLS:
                gen = [r["token_ids"] for r in last[m].results]
                agree = [a == c for g, p in zip(gen, plain, strict=True) for a, c in zip(g, p, strict=False)]
                entry[m] = {"speedup": _median([x / y for x, y in zip(tps[m], tps["none"], strict=True)]),
                            "agreement": float(np.mean(agree)), "exit_shares": last[m].exit_shares,
                            "perplexity": statistics.median(_perplexity(runner, i, g)
                                                            for i, g in zip(ids, gen, strict=True))}
            out["runs"].append(entry)
            print(json.dumps(entry), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--thresholds", nargs="+", default=None,
                    help="exit max-prob thresholds (default: the bundle's exit-mode calibration, else 0.5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lm_exit_fill.json")
    args = ap.parse_args()
    thresholds: list[Any] = [float(t) for t in args.thresholds] if args.thresholds else []
    if not thresholds:
        from eecompile.bundle import Bundle

        cal = (Bundle.load(args.bundle).manifest.decoder or {}).get("calibration", {}).get("exit")
        thresholds = [cal["thresholds"]] if cal else [0.5]
    res = run(args.bundle, args.batches, args.tokens, args.rounds, thresholds, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
