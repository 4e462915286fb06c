"""Load test of `eecompile serve` (Ray Serve on loopback): N concurrent clients x M requests of mixed difficulty.

Checks and figures, one run:
* every answer equals the local runner's answer for that input (exit index exactly, outputs to 1e-4), none lost;
* p50/p99 latency and throughput of the early-exit endpoint, of the same endpoint with thresholds "never"
  (every sample runs the whole chain), and of a plain single-process runner driven by the same client threads;
* the replica's resident memory (VmRSS) before, during and after the load;
* with 2 replicas, one is killed (SIGKILL) mid-run: Ray replaces it, clients retry failed requests, and no
  answer is wrong.

    .venv/bin/python -m benchmarks.serve [--clients 8] [--requests 40] [--quick]

Writes benchmarks/results/serve.json; the figures are copied by hand into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tests.serve.client import get, predict_npz  # noqa: E402
from tests.serve.conftest import build_served_bundle, free_port, mixed_inputs  # noqa: E402


def _percentiles(latencies: list[float]) -> dict[str, float]:
    a = np.asarray(latencies) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def _workload(clients: int, requests: int) -> list[list[np.ndarray]]:
    """Per client, its requests: 1-3 samples each, of mixed difficulty (a third per exit, roughly)."""
    return [[mixed_inputs(1 + (c + i) % 3, seed=10_000 * c + i) for i in range(requests)] for c in range(clients)]


def _drive(work: list[list[np.ndarray]], call: Callable[[np.ndarray], Any], retries: int = 0
           ) -> tuple[list[list[Any]], list[float], int, float]:
    """Run each client's requests in its own thread: answers, per-request latencies, retried errors, seconds."""
    answers: list[list[Any]] = [[None] * len(w) for w in work]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for i, x in enumerate(work[c]):
            t0 = time.perf_counter()
            for attempt in range(retries + 1):
                result = call(x)
                if result is not None:
                    break
                with lock:
                    errors[0] += 1
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
            with lock:
                latencies.append(time.perf_counter() - t0)
            answers[c][i] = result

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(work))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, latencies, errors[0], time.perf_counter() - t0


def _check(work: list[list[np.ndarray]], answers: list[list[Any]], expected: list[list[Any]]) -> dict[str, int]:
    lost = wrong = 0
    for c, w in enumerate(work):
        for i in range(len(w)):
            got, want = answers[c][i], expected[c][i]
            if got is None:
                lost += 1
                continue
            logits, exit_index = got
            if (list(exit_index) != list(want.exit_index)
                    or not np.allclose(logits, want.outputs["logits"], rtol=1e-4, atol=1e-5)):
                wrong += 1
    return {"lost": lost, "wrong": wrong}


def _http_call(url: str, thresholds: list | None = None) -> Callable[[np.ndarray], Any]:
    """One request as an .npz body (thresholds ride along as a string array); None for any failure."""
    def call(x: np.ndarray) -> Any:
        arrays: dict[str, np.ndarray] = {"image": x}
        if thresholds is not None:
            arrays["thresholds"] = np.array([str(t) for t in thresholds])
        try:
            status, out = predict_npz(url, arrays, timeout=30)
        except (OSError, ValueError):  # connection reset by a dying replica, a non-npz error page
            return None
        if status != 200:
            return None
        return out["logits"], out["exit_index"].tolist()
    return call


def _replica_pids(url: str, want: int, timeout: float = 60.0) -> list[int]:
    """Process ids of ``want`` live replicas, from ``/v1/health`` (which answers from a random replica)."""
    seen: set[int] = set()
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, body = get(f"{url}/health")
        if status == 200:
            pid = json.loads(body)["pid"]
            if Path(f"/proc/{pid}").exists():
                seen.add(pid)
        if len(seen) >= want:
            break
    return sorted(seen)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def load_test_args(doc: str, requests: int, quick: tuple[int, int], out: str) -> argparse.Namespace:
    """The options of a load test: --clients, --requests (per client), --quick (``quick`` clients x requests),
    --out (default ``benchmarks/results/OUT``); sets OMP_NUM_THREADS=1 unless given."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=requests, help="per client")
    ap.add_argument("--quick", action="store_true", help=f"{quick[0]} clients x {quick[1]} requests")
    ap.add_argument("--out", type=Path, default=HERE / "results" / out)
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests = quick
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return args


def main() -> None:
    args = load_test_args(__doc__ or "", 40, (4, 8), "serve.json")

    import ray
    from ray import serve
    from torch_models import export

    import eecompile
    from eecompile.serve.ray_app import ServeOptions, run_app

    work_dir = Path(tempfile.mkdtemp(prefix="eecompile-serve-bench-"))
    bundle = build_served_bundle(work_dir, export("resnet", work_dir))
    work = _workload(args.clients, args.requests)
    runner = eecompile.load(bundle, threads=1)
    expected = [[runner.run({"image": x}) for x in w] for w in work]
    n_req = args.clients * args.requests
    n_samples = sum(x.shape[0] for w in work for x in w)
    exits = np.bincount(np.concatenate([e.exit_index for w in expected for e in w]), minlength=3)
    results: dict[str, Any] = {"clients": args.clients, "requests_per_client": args.requests,
                               "requests": n_req, "samples": n_samples,
                               "exit_shares": (exits / exits.sum()).round(3).tolist(), "cpus": os.cpu_count()}

    # Plain single-process runner, same client threads, same inputs.
    def local(x: np.ndarray) -> Any:
        r = runner.run({"image": x})
        return r.outputs["logits"], r.exit_index.tolist()

    answers, lat, _, secs = _drive(work, local)
    results["runner"] = {**_percentiles(lat), "requests_per_s": n_req / secs, **_check(work, answers, expected)}

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="ERROR")
    port = free_port()
    options = ServeOptions(bundle=str(bundle), backend_options={"threads": 1}, max_batch_size=32, batch_wait_ms=5)
    try:
        run_app(options, port=port, replicas=1)
        base = f"http://127.0.0.1:{port}/v1"
        url = f"{base}/predict"
        _drive([w[:2] for w in work], _http_call(url))  # warm-up
        pid = _replica_pids(base, 1)[0]
        rss = [_rss_mb(pid)]
        for name, thresholds in (("early_exit", None), ("never", ["never", "never"])):
            never = thresholds is not None
            want = [[runner.run({"image": x}, thresholds="never") for x in w] for w in work] if never else expected
            answers, lat, errors, secs = _drive(work, _http_call(url, thresholds))
            rss.append(_rss_mb(pid))
            results[f"serve_{name}"] = {**_percentiles(lat), "requests_per_s": n_req / secs, "errors": errors,
                                        **_check(work, answers, want)}
        answers, lat, errors, secs = _drive(work, _http_call(url))  # once more: does memory grow?
        rss.append(_rss_mb(pid))
        results["replica_rss_mb"] = [round(r, 1) for r in rss]

        # Two replicas; kill one a moment into the run.
        run_app(options, port=port, replicas=2)
        pids = _replica_pids(base, 2)
        killed: dict[str, Any] = {}

        def killer() -> None:
            time.sleep(1.0)
            victim = pids[0]
            os.kill(victim, signal.SIGKILL)
            killed["pid"], killed["at"] = victim, time.time()

        k = threading.Thread(target=killer)
        t0 = time.time()
        k.start()
        answers, lat, errors, secs = _drive(work, _http_call(url), retries=8)
        k.join()
        deadline = time.time() + 60
        while time.time() < deadline:
            status = serve.status().applications["eecompile"].deployments["eecompile"]
            if status.replica_states.get("RUNNING", 0) == 2:
                break
            time.sleep(0.5)
        results["kill_one_of_two"] = {**_percentiles(lat), "requests_per_s": n_req / secs,
                                      "retried_errors": errors, **_check(work, answers, expected),
                                      "killed_after_s": round(killed["at"] - t0, 2),
                                      "replicas_running_after": status.replica_states.get("RUNNING", 0),
                                      "replicas_after": _replica_pids(base, 2)}
    finally:
        serve.shutdown()
        ray.shutdown()
    ee, nv, rn = results["serve_early_exit"], results["serve_never"], results["runner"]
    results["ratios"] = {"throughput_ee_vs_never": ee["requests_per_s"] / nv["requests_per_s"],
                         "p50_ee_vs_never": ee["p50_ms"] / nv["p50_ms"],
                         "throughput_ee_vs_runner": ee["requests_per_s"] / rn["requests_per_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    bad = sum(results[k]["wrong"] + results[k]["lost"] for k in ("runner", "serve_early_exit", "serve_never",
                                                               "kill_one_of_two"))
    if bad:
        sys.exit(f"{bad} wrong or lost answers")


if __name__ == "__main__":
    main()
