"""``python -m benchmarks.lm_decoding [--bundle B] [--batches 1 4 8] [--tokens 64] [--rounds 3]``: decoding figures.

Tokens/s of ``speculative`` and ``exit`` against ``none`` on the same decoder bundle (default: the SmolLM2 bundle
``make lm-demo`` builds), ONNX Runtime CPU, at each batch size, on 64-token continuations of varied prompts.
Paired as the other benchmarks are: every round runs the three modes back to back (order reversed every other
round) and each ratio is computed within a round; medians with min-max over rounds. Also: acceptance rate and
tokens per verification (speculative), exit shares, token agreement with ``none`` and the full model's perplexity
of the generated text (exit), and the cost ratios of the speedup model (LayerSkip/Kangaroo):

- r: one draft step (the segments up to the exit + the draft head, one position) / one plain decode step
- g: one verification (the remaining segments + the shared head over k+1 positions) / one plain decode step

Writes ``benchmarks/results/lm.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLE = HERE.parent / "examples" / "smollm2" / "out" / "smollm2.eebundle"
PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "The three primary colors are",
    "Once upon a time, in a small village,", "To make a cup of tea, first", "The theory of relativity says that",
    "import numpy as np\n", "The best way to learn a language is", "Water boils at a temperature of",
    "My favourite book is", "The stock market fell today because", "In 1969, the first humans",
    "A healthy breakfast includes", "The Python list method append", "Dear customer, thank you for",
    "The largest planet in the solar system is",
]


def _median(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _perplexity(runner: Any, prompt_ids: list[int], gen: list[int]) -> float:
    """exp(mean NLL) of ``gen`` under the full model given the prompt (all segments, shared head)."""
    if not gen:
        return float("nan")
    row = runner._new_row(0, prompt_ids + gen)
    out = runner._stack([row], 0, len(runner.segments) - 1)[0]
    logits = runner._run_head(out[None], 2.0, True)["logits"][0].astype(np.float64)
    n = len(prompt_ids)
    z = logits[n - 1:n - 1 + len(gen)]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(np.exp(-np.mean(logp[np.arange(len(gen)), gen])))


def run(bundle: Path, batches: list[int], tokens: int, rounds: int, threads: int | None) -> dict[str, Any]:
    from eecompile.decoder.calibrate import measure_costs
    from eecompile.runtimes.lm import DecoderRunner

    runner = DecoderRunner(bundle, threads=threads)
    tok = runner.tokenizer()
    results: dict[str, Any] = {"bundle": bundle.name, "tokens": tokens, "rounds": rounds,
                               "threads": threads, "exits": runner.exits, "batches": {}}
    for b in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b * 2)]  # two batches' worth of varied prompts
        per: dict[str, list[float]] = {"speculative": [], "drafting_on": [], "exit": []}
        tps: dict[str, list[float]] = {"none": [], "speculative": [], "drafting_on": [], "exit": []}
        copied: dict[str, float] = {}
        last: dict[str, Any] = {}
        modes = ["none", "speculative", "drafting_on", "exit"]
        ex0 = runner.exits[0]
        # speculative: as calibrated for this batch size (drafting may be off); drafting_on: the exit's own
        # threshold and k, uncalibrated; exit: the bundle's exit-mode thresholds (Learn-then-Test when calibrated)
        kw = {"none": {"mode": "none"}, "speculative": {"mode": "speculative"}, "exit": {"mode": "exit"},
              "drafting_on": {"mode": "speculative", "calibrated": False, "draft_tokens": int(ex0["draft_tokens"]),
                              "thresholds": [e["gate"]["threshold"] if i == 0 else "never"
                                             for i, e in enumerate(runner.exits)]}}
        runner.generate(prompts[:b], 4, mode="none", batch=b)  # warm-up
        load = [os.getloadavg()[0]]
        for rnd in range(rounds):
            got = {}
            for m in (modes if rnd % 2 == 0 else modes[::-1]):
                runner.calls["kv_bytes_copied"] = 0
                got[m] = runner.generate(prompts, tokens, batch=b, **kw[m])  # type: ignore[arg-type]
                tps[m].append(got[m].tokens_per_s)
                n_gen = sum(len(r["token_ids"]) for r in got[m].results)
                copied[m] = runner.calls["kv_bytes_copied"] / max(n_gen, 1)
            for m in ("speculative", "drafting_on", "exit"):
                per[m].append(got[m].tokens_per_s / got["none"].tokens_per_s)
            last = got
            load.append(os.getloadavg()[0])
        plain = [r["token_ids"] for r in last["none"].results]
        spec = last["drafting_on"]
        ex = last["exit"]
        agree = [a == c for r, p in zip(ex.results, plain, strict=True)
                 for a, c in zip(r["token_ids"], p, strict=False)]
        ppl_exit = statistics.median([_perplexity(runner, list(tok.encode(r["prompt"]).ids), r["token_ids"])
                                      for r in ex.results[:4]])
        ppl_none = statistics.median([_perplexity(runner, list(tok.encode(r["prompt"]).ids), r["token_ids"])
                                      for r in last["none"].results[:4]])
        results["batches"][str(b)] = {
            "tokens_per_s": {m: _median(v) for m, v in tps.items()},
            "speedup": {m: _median(v) for m, v in per.items()},
            "speculative_identical_to_none": all([r["token_ids"] for r in last[m].results] == plain
                                                 for m in ("speculative", "drafting_on")),
            "drafting_off_by_calibration": bool(last["speculative"].stats.get("drafting_off")),
            "kv_bytes_copied_per_token": copied, "load_average_1min": load,
            "acceptance_rate": spec.acceptance_rate, "mean_accepted_length": spec.mean_accepted_length,
            "exit_shares": ex.exit_shares, "exit_token_agreement": sum(agree) / max(len(agree), 1),
            "perplexity": {"none": ppl_none, "exit": ppl_exit},
            "costs": measure_costs(runner, b, int(runner.exits[0].get("draft_tokens", 4))),
        }
        print(json.dumps({b: results["batches"][str(b)]}, indent=1))
    return results


def genai_plain(model_dir: Path, bundle: Path, batches: list[int], tokens: int, rounds: int,
                threads: int) -> dict[str, Any]:
    """Plain greedy decoding in onnxruntime-genai (a model built by its builder from the same weights:
    ``python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p fp32 -e cpu``) against eecompile's ``none``,
    each round one right after the other; tokens/s over the generation's wall time, prefill included."""
    import onnxruntime_genai as og

    from eecompile.runtimes.lm import DecoderRunner

    cfg_path = model_dir / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=1))
    model = og.Model(str(model_dir))
    tok = og.Tokenizer(model)
    ours = DecoderRunner(bundle, threads=threads)
    eos = ours.eos_token_id

    def genai(prompts: list[str]) -> float:
        longest = max(len(tok.encode(p)) for p in prompts)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=longest + tokens, do_sample=False, batch_size=len(prompts))
        t = time.perf_counter()
        g = og.Generator(model, params)
        g.append_tokens(tok.encode_batch(prompts))
        while not g.is_done():
            g.generate_next_token()
        wall = time.perf_counter() - t
        n = 0
        for i in range(len(prompts)):
            gen = list(g.get_sequence(i))[longest:]  # prompts are padded to the longest
            n += gen.index(eos) + 1 if eos in gen else len(gen)
        return n / wall

    out: dict[str, Any] = {}
    for b in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        genai(prompts)
        ours.generate(prompts, 4, batch=b)
        pairs = [(genai(prompts), ours.generate(prompts, tokens, batch=b).tokens_per_s) for _ in range(rounds)]
        out[str(b)] = {"genai_tokens_per_s": [a for a, _ in pairs], "none_tokens_per_s": [c for _, c in pairs],
                       "none_over_genai": [c / a for a, c in pairs], "load_average_1min": os.getloadavg()[0]}
        print(json.dumps({b: out[str(b)]}))
    return out


def write_md(res: dict[str, Any], path: Path) -> None:
    lines = ["| batch | none tok/s | speculative (calibrated) | drafting on | exit | acceptance | tokens/verify | "
             "exit agreement | ppl none / exit | r | g | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b, d in res["batches"].items():
        sp, on, ex = d["speedup"]["speculative"], d["speedup"]["drafting_on"], d["speedup"]["exit"]
        off = " (off)" if d["drafting_off_by_calibration"] else ""
        lines.append(
            f"| {b} | {d['tokens_per_s']['none']['median']:.1f} | {sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})"
            f"{off} | {on['median']:.2f}x ({on['min']:.2f}-{on['max']:.2f}) "
            f"| {ex['median']:.2f}x ({ex['min']:.2f}-{ex['max']:.2f}) | {d['acceptance_rate']:.0%} | "
            f"{d['mean_accepted_length']:.2f} | {d['exit_token_agreement']:.0%} | "
            f"{d['perplexity']['none']:.2f} / {d['perplexity']['exit']:.2f} | {d['costs']['r']:.2f} | "
            f"{d['costs']['g']:.2f} | {min(d['load_average_1min']):.1f}-{max(d['load_average_1min']):.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--genai", type=Path, default=None,
                    help="Only compare plain decoding with this onnxruntime-genai model directory.")
    args = ap.parse_args()
    if args.genai is not None:
        res = genai_plain(args.genai, args.bundle, args.batches, args.tokens, args.rounds, args.threads)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lm_genai.json").write_text(json.dumps(res, indent=1))
        return
    res = run(args.bundle, args.batches, args.tokens, args.rounds, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm.json").write_text(json.dumps(res, indent=1))
    write_md(res, args.out / "lm.md")
    print((args.out / "lm.md").read_text())


if __name__ == "__main__":
    main()
