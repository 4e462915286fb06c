"""Fault tolerance under load: two replicas serve concurrent clients; one replica is killed mid-run through Ray's
API (``ray.kill`` of its actor); Serve replaces it; clients retry the requests that failed, and every request is
answered exactly as the local runner answers it (none lost, none wrong)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serve.client import get, predict_npz
from tests.serve.conftest import mixed_inputs

pytestmark = pytest.mark.slow

CLIENTS, REQUESTS, RETRIES = 4, 30, 10


def _replicas(url: str, want: int, timeout: float = 60.0) -> set[str]:
    """Ids (``app#deployment#tag``) of ``want`` replicas that answer ``/health`` (Serve picks one per call)."""
    seen: set[str] = set()
    deadline = time.time() + timeout
    while len(seen) < want and time.time() < deadline:
        status, body = get(f"{url}/health")
        if status == 200:
            seen.add(json.loads(body)["replica"])
    return seen


def _actor_name(replica: str) -> tuple[str, str]:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(replica)]
    assert len(names) == 1, names
    return names[0]["name"], names[0]["namespace"]


def test_a_replica_killed_mid_load_loses_no_request(served_bundle: Path, ray_serve) -> None:
    import ray
    from ray import serve

    import eecompile
    from eecompile.serve.ray_app import ServeOptions, run_app

    port = ray_serve["port"]
    url = f"http://127.0.0.1:{port}/kill/v1"
    run_app(ServeOptions(bundle=str(served_bundle), backend_options={"threads": 1}), port=port, replicas=2,
            cpus_per_replica=0.5, name="kill", route_prefix="/kill/v1")
    try:
        before = _replicas(url, 2)
        assert len(before) == 2
        work = [[mixed_inputs(1 + (c + i) % 3, seed=5000 * c + i) for i in range(REQUESTS)] for c in range(CLIENTS)]
        answers: list[list[dict | None]] = [[None] * REQUESTS for _ in range(CLIENTS)]
        errors, answered, lock = [0], [0], threading.Lock()

        def client(c: int) -> None:
            for i, x in enumerate(work[c]):
                for attempt in range(RETRIES):
                    try:
                        status, out = predict_npz(f"{url}/predict", {"image": x}, timeout=30)
                    except (OSError, ValueError):  # a connection reset by the dying replica
                        status, out = -1, None
                    if status == 200:
                        answers[c][i] = out
                        with lock:
                            answered[0] += 1
                        break
                    with lock:
                        errors[0] += 1
                    time.sleep(min(2.0, 0.1 * 2 ** attempt))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        while answered[0] < CLIENTS * REQUESTS // 4 and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        victim = sorted(before)[0]
        name, namespace = _actor_name(victim)
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        killed_at = answered[0]
        for t in threads:
            t.join(120)
        assert killed_at < CLIENTS * REQUESTS, "the load ended before the kill"

        deadline = time.time() + 60
        while time.time() < deadline:
            states = serve.status().applications["kill"].deployments["eecompile"].replica_states
            if states.get("RUNNING", 0) == 2:
                break
            time.sleep(0.5)
        assert states.get("RUNNING", 0) == 2, states
        after = _replicas(url, 2)
        assert victim not in after and len(after) == 2  # Serve replaced the killed replica

        with eecompile.load(served_bundle) as runner:
            lost = wrong = 0
            for c in range(CLIENTS):
                for i, x in enumerate(work[c]):
                    got = answers[c][i]
                    if got is None:
                        lost += 1
                        continue
                    want = runner.run({"image": x})
                    if (got["exit_index"].tolist() != want.exit_index.tolist()
                            or not np.allclose(got["logits"], want.outputs["logits"], rtol=1e-4, atol=1e-5)):
                        wrong += 1
        assert lost == 0 and wrong == 0, (lost, wrong, errors[0])
    finally:
        serve.delete("kill")
