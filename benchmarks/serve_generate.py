"""Load test of `/v1/generate` (Ray Serve on loopback) with iteration-level batching: N concurrent clients x M
requests of mixed lengths against a random-weight Llama decoder bundle (8 layers, hidden 256; nothing downloaded).

Checks and figures, one run:
* every answer equals ``DecoderRunner.generate`` for that prompt alone (greedy), none lost;
* tokens/s served, time to first token and request latency (p50/p99; short and long requests apart), and the
  rows per decode step, for the endpoint with a running batch of 8 rows and the same endpoint with 1 row (one
  request decodes at a time: no batching);
* the same requests queued at once on a local decode batch of 8 rows (no server, no HTTP): what the decoder
  itself gives.

    .venv/bin/python -m benchmarks.serve_generate [--clients 8] [--requests 6] [--quick]

Writes benchmarks/results/serve_generate.json; the figures are copied by hand into benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve import load_test_args  # noqa: E402
from tests.serve.client import post  # noqa: E402
from tests.serve.conftest import free_port  # noqa: E402

SHORT = 16  # max_new_tokens at or below: a short request


def build_bundle(root: Path, max_length: int = 160) -> Path:
    import yaml

    from eecompile.decoder.compile import compile_decoder
    from eecompile.models.lm import export_decoder, tiny_llama

    export_decoder(tiny_llama(seed=0, layers=8, hidden=256, heads=8, kv_heads=4, vocab=512, max_positions=256),
                   root / "lm.onnx")
    spec = {"kind": "decoder", "model": "lm.onnx", "max_length": max_length,
            "exits": [{"after_layer": 2, "gate": {"kind": "max_prob", "threshold": 0.5}, "draft_tokens": 4}]}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    compile_decoder(root / "spec.yaml", root / "lm.eebundle")
    return root / "lm.eebundle"


def workload(clients: int, requests: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    return [[{"token_ids": rng.integers(1, 512, int(rng.integers(4, 17))).tolist(),
              "max_new_tokens": int(rng.choice([4, 8, 12, 16, 32, 48, 64]))} for _ in range(requests)]
            for _ in range(clients)]


def drive(url: str, work: list[list[dict[str, Any]]]) -> tuple[list[list[dict | None]], float]:
    answers: list[list[dict | None]] = [[None] * len(w) for w in work]

    def client(c: int) -> None:
        for i, doc in enumerate(work[c]):
            t0 = time.perf_counter()
            try:
                status, body, _ = post(url, json.dumps(doc).encode(), "application/json", timeout=120)
            except OSError:
                continue
            if status == 200:
                answers[c][i] = {**json.loads(body), "latency_ms": (time.perf_counter() - t0) * 1e3}

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(work))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - t0


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1)}


def summarize(work: list[list[dict]], answers: list[list[dict | None]], expected: list[list[list[int]]],
              secs: float) -> dict[str, Any]:
    flat = [(d, a, e) for w, aa, ee in zip(work, answers, expected, strict=True)
            for d, a, e in zip(w, aa, ee, strict=True)]
    got = [(d, a) for d, a, _ in flat if a is not None]
    tokens = sum(len(a["token_ids"]) for _, a in got)
    return {"tokens_per_s": round(tokens / secs, 1), "tokens": tokens, "seconds": round(secs, 2),
            "lost": sum(1 for _, a, _ in flat if a is None),
            "wrong": sum(1 for _, a, e in flat if a is not None and a["token_ids"] != e),
            "ttft_ms": pct([a["figures"]["time_to_first_token_ms"] for _, a in got]),
            "latency_short_ms": pct([a["latency_ms"] for d, a in got if d["max_new_tokens"] <= SHORT]),
            "latency_long_ms": pct([a["latency_ms"] for d, a in got if d["max_new_tokens"] > SHORT]),
            "mean_batch_rows": round(float(np.mean([a["figures"]["mean_batch_rows"] for _, a in got])), 2)}


def main() -> None:
    args = load_test_args(__doc__ or "", 6, (4, 3), "serve_generate.json")

    import ray
    from ray import serve

    from eecompile.runtimes.lm import DecoderRunner
    from eecompile.serve.ray_app import ServeOptions, run_app

    bundle = build_bundle(Path(tempfile.mkdtemp(prefix="eecompile-serve-gen-")))
    work = workload(args.clients, args.requests)
    local = DecoderRunner(bundle, threads=1)
    expected = [[local.generate([d["token_ids"]], d["max_new_tokens"]).results[0]["token_ids"] for d in w]
                for w in work]
    results: dict[str, Any] = {"clients": args.clients, "requests_per_client": args.requests,
                               "load_average_before": os.getloadavg()[0]}
    flat = [d for w in work for d in w]
    local.generate([d["token_ids"] for d in flat[:8]], 8, batch=8)  # warm-up, as the endpoints get one
    batch = local.open_batch("none", max_batch=8)
    t0 = time.perf_counter()
    for d in flat:  # every request queued at once, each to its own budget: the decoder alone, no server
        batch.add(d["token_ids"], d["max_new_tokens"])
    n_tokens = 0
    while batch.active or batch.waiting:
        n_tokens += sum(len(ev.token_ids) for ev in batch.step())
    results["local_decode_batch8"] = {"tokens_per_s": round(n_tokens / (time.perf_counter() - t0), 1)}

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="ERROR")
    port = free_port()
    try:
        for rows in (8, 1):
            name = f"rows{rows}"
            run_app(ServeOptions(bundle=str(bundle), backend_options={"threads": 1}, max_batch_size=rows),
                    port=port, name=name, route_prefix=f"/{name}/v1")
            url = f"http://127.0.0.1:{port}/{name}/v1/generate"
            drive(url, [w[:1] for w in work[:2]])  # warm-up
            answers, secs = drive(url, work)
            results[f"serve_{name}"] = summarize(work, answers, expected, secs)
            results[f"serve_{name}"]["an_answer"] = answers[0][0]
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["load_average_after"] = os.getloadavg()[0]
    b, one = results["serve_rows8"], results["serve_rows1"]
    results["ratios"] = {"tokens_per_s_rows8_vs_rows1": round(b["tokens_per_s"] / one["tokens_per_s"], 2),
                         "short_p50_rows1_vs_rows8": round(one["latency_short_ms"]["p50"]
                                                           / b["latency_short_ms"]["p50"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    bad = sum(results[k]["wrong"] + results[k]["lost"] for k in ("serve_rows8", "serve_rows1"))
    if bad:
        sys.exit(f"{bad} wrong or lost answers")


if __name__ == "__main__":
    main()
