"""``python -m benchmarks.recurrent_decoding [--layers 8] [--hidden 128] [--batches 1 4 8] [--tokens 32]``:
decoding figures for a recurrent-state (Mamba-style) decoder bundle.

Builds a random-weight ``eecompile.models.mamba.tiny_mamba`` (nothing downloaded) with a character tokenizer,
compiles it with one exit, trains its draft head briefly on the pydoc topics (``train-heads``), then runs
``benchmarks.lm_decoding``'s paired measurement on it: tokens/s of ``speculative`` and ``exit`` against ``none``
in the same rounds, acceptance, exit shares and agreement, the cost ratios r and g. Also the share of positions
the runtime feeds to segments a second time after rejected drafts (``state_positions_rerun`` /
``state_positions``: the cost of restoring checkpoints instead of keeping per-position states). Random weights:
the figures measure the runtime, not a model's drafting quality.

Writes ``benchmarks/results/recurrent.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.lm_decoding import HERE, run, write_md


def build(root: Path, layers: int, hidden: int, exit_after: int) -> Path:
    from eecompile.decoder.compile import compile_decoder
    from eecompile.decoder.train import train_draft_heads
    from eecompile.models.lm import char_tokenizer
    from eecompile.models.mamba import export_mamba, tiny_mamba

    export_mamba(tiny_mamba(seed=0, layers=layers, hidden=hidden, d_state=16), root / "mamba.onnx")
    char_tokenizer(root / "tokenizer.json", 128)
    spec = {"kind": "decoder", "model": "mamba.onnx", "max_length": 512, "tokenizer": "tokenizer.json",
            "exits": [{"after_layer": exit_after, "gate": {"kind": "max_prob", "threshold": 0.5},
                       "draft_tokens": 4}]}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    compile_decoder(root / "spec.yaml", root / "mamba.eebundle")
    train_draft_heads(root / "mamba.eebundle", vocab=96, epochs=2, max_tokens=3000, generate_tokens=16, threads=2)
    return root / "mamba.eebundle"


def rerun_share(bundle: Path, tokens: int, batch: int) -> dict[str, Any]:
    from benchmarks.lm_decoding import PROMPTS
    from eecompile.runtimes.lm import DecoderRunner

    runner = DecoderRunner(bundle, threads=2)
    res = runner.generate(PROMPTS[:batch], tokens, mode="speculative", calibrated=False, batch=batch)
    return {"state_positions": runner.calls["state_positions"],
            "state_positions_rerun": runner.calls["state_positions_rerun"],
            "share": runner.calls["state_positions_rerun"] / max(1, runner.calls["state_positions"]),
            "acceptance_rate": res.acceptance_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--exit-after", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # built in a child process: torch's threads, once used for training, slow ONNX Runtime down in the same
        # process (measured: plain decoding at half speed right after train-heads)
        child = multiprocessing.get_context("spawn").Process(target=build, args=(Path(tmp), args.layers,
                                                                                 args.hidden, args.exit_after))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the bundle failed (exit code {child.exitcode})")
        bundle = Path(tmp) / "mamba.eebundle"
        res = run(bundle, args.batches, args.tokens, args.rounds, args.threads)
        res["model"] = {"kind": "tiny_mamba (random weights)", "layers": args.layers, "hidden": args.hidden}
        res["rerun"] = {str(b): rerun_share(bundle, args.tokens, b) for b in args.batches}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recurrent.json").write_text(json.dumps(res, indent=1))
    write_md(res, args.out / "recurrent.md")
    with open(args.out / "recurrent.md", "a") as f:
        f.write("\n| batch | positions fed again after rejected drafts |\n|---|---|\n")
        for b, d in res["rerun"].items():
            f.write(f"| {b} | {d['share']:.1%} ({d['state_positions_rerun']} of {d['state_positions']}) |\n")
    print((args.out / "recurrent.md").read_text())


if __name__ == "__main__":
    main()
