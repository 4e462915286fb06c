"""Ray Serve end to end on CPU: a real Ray instance and Serve HTTP proxy on a free loopback port, requests
from concurrent clients, answers compared with the local runner; bad requests; metrics; clean shutdown."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.serve.client import get, post, predict_json, predict_npz
from tests.serve.conftest import mixed_inputs

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow

MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def endpoint(served_bundle: Path, ray_serve):
    from ray import serve

    from eecompile.serve.ray_app import ServeOptions, run_app

    port = ray_serve["port"]
    run_app(ServeOptions(bundle=str(served_bundle), max_batch_size=16, batch_wait_ms=20, max_body_bytes=MAX_BODY),
            port=port, name="predict", route_prefix="/v1")
    yield f"http://127.0.0.1:{port}/v1", ray_serve["metrics_port"]
    serve.delete("predict")


@pytest.fixture(scope="module")
def runner(served_bundle: Path):
    import eecompile

    with eecompile.load(served_bundle) as r:
        yield r


def test_health(endpoint) -> None:
    url, _ = endpoint
    status, body = get(f"{url}/health")
    assert status == 200 and json.loads(body)["inputs"] == ["image"]


def test_concurrent_requests_match_the_local_runner(endpoint, runner) -> None:
    url, _ = endpoint
    sizes = [1, 3, 1, 2, 5, 1, 1, 4, 2, 1, 1, 3, 1, 2, 1, 1]
    xs = [mixed_inputs(n, seed=100 + i) for i, n in enumerate(sizes)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda x: predict_json(f"{url}/predict", {"image": x}), xs))
    seen = set()
    for x, (status, doc) in zip(xs, answers, strict=True):
        assert status == 200, doc
        local = runner.run({"image": x})
        np.testing.assert_array_equal(doc["exit_index"], local.exit_index)
        np.testing.assert_allclose(np.array(doc["outputs"]["logits"], np.float32), local.outputs["logits"],
                                   rtol=1e-4, atol=1e-5)
        seen |= set(doc["exit_index"])
    assert seen == {0, 1, 2}  # mixed difficulty: every exit answered some sample


def test_npz_body_and_request_thresholds(endpoint, runner) -> None:
    url, _ = endpoint
    x = mixed_inputs(6, seed=7)
    status, out = predict_npz(f"{url}/predict", {"image": x})
    assert status == 200
    local = runner.run({"image": x})
    np.testing.assert_array_equal(out["exit_index"], local.exit_index)
    np.testing.assert_allclose(out["logits"], local.outputs["logits"], rtol=1e-4, atol=1e-5)
    status, doc = predict_json(f"{url}/predict", {"image": x}, thresholds=["never", "never"])
    assert status == 200 and doc["exit_index"] == [2] * 6
    status, doc = predict_json(f"{url}/predict", {"image": x}, thresholds=["always", 0.5])
    assert status == 200 and doc["exit_index"] == [0] * 6


def _cli_error(tmp_path: Path, bundle: Path, arrays: dict[str, np.ndarray]) -> str:
    """The one line `eecompile run` prints for the same arrays in a file, with the file name as 'request'."""
    from eecompile.cli import cli

    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    result = CliRunner().invoke(cli, ["run", str(bundle), "--data", str(data), "-o", str(tmp_path / "o.npz")])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    # The same message, naming the request where the CLI names the file.
    return line.removeprefix("error: ").replace(str(data), "request").replace("the file has", "the request has")


@pytest.mark.parametrize("arrays", [
    {"img": np.zeros((1, 3, 32, 32), np.float32)},  # wrong name
    {"image": np.zeros((1, 3, 32, 32), np.int64)},  # wrong dtype
    {"image": np.zeros((1, 3, 16, 32), np.float32)},  # wrong shape
], ids=["name", "dtype", "shape"])
def test_bad_input_gets_400_with_the_cli_message(endpoint, served_bundle, tmp_path, arrays) -> None:
    url, _ = endpoint
    status, doc = predict_npz(f"{url}/predict", arrays)
    assert status == 400
    assert doc["error"] == _cli_error(tmp_path, served_bundle, arrays)


def test_bad_json_and_thresholds(endpoint) -> None:
    url, _ = endpoint
    status, body, _ = post(f"{url}/predict", b"{not json", "application/json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, doc = predict_json(f"{url}/predict", {"image": mixed_inputs(1)}, thresholds=[0.5])
    assert status == 400 and "give one per exit" in doc["error"]
    status, doc = predict_json(f"{url}/predict", {"image": mixed_inputs(1)[:, :, :5]})
    assert status == 400 and "the model expects [B, 3, 32, 32]" in doc["error"]


def test_generate_on_a_classifier_bundle_gets_400(endpoint) -> None:
    url, _ = endpoint
    status, body, _ = post(f"{url}/generate", b'{"prompt": "hi", "max_new_tokens": 4}', "application/json")
    err = json.loads(body)["error"]
    assert status == 400 and "not a decoder bundle" in err and "/v1/predict" in err


def test_oversized_body_and_too_many_samples_get_413(endpoint) -> None:
    url, _ = endpoint
    status, body, _ = post(f"{url}/predict", b"0" * (MAX_BODY + 1), "application/octet-stream")
    assert status == 413 and "over the limit" in json.loads(body)["error"]
    buf = io.BytesIO()
    np.savez(buf, image=mixed_inputs(17))  # --max-batch-size 16
    status, body, _ = post(f"{url}/predict", buf.getvalue(), "application/octet-stream")
    assert status == 413 and "at most 16" in json.loads(body)["error"]


def test_a_few_seconds_of_load_then_metrics(endpoint, runner) -> None:
    url, metrics_port = endpoint
    stop = time.time() + 3
    wrong, counts, lock = [], [0], threading.Lock()

    def client(seed: int) -> None:
        i = 0
        while time.time() < stop:
            x = mixed_inputs(1 + (seed + i) % 3, seed=1000 * seed + i)
            status, doc = predict_json(f"{url}/predict", {"image": x})
            local = runner.run({"image": x})
            ok = status == 200 and doc["exit_index"] == local.exit_index.tolist()
            with lock:
                counts[0] += 1
                if not ok:
                    wrong.append((status, doc))
            i += 1

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts[0] > 6 and not wrong
    text = ""
    deadline = time.time() + 30
    while time.time() < deadline:
        status, body = get(f"http://127.0.0.1:{metrics_port}/metrics")
        text = body.decode()
        if "eecompile_exit_samples" in text and "eecompile_batch_samples_bucket" in text:
            break
        time.sleep(1)
    for name in ("eecompile_requests", "eecompile_request_latency_ms_bucket", "eecompile_exit_samples",
                 "eecompile_batch_samples_bucket"):
        assert name in text, name
    assert 'status="200"' in text and 'exit="0"' in text


def test_autoscaled_deployment_answers(served_bundle, ray_serve, runner) -> None:
    from ray import serve

    from eecompile.serve.ray_app import ServeOptions, run_app

    port = ray_serve["port"]
    run_app(ServeOptions(bundle=str(served_bundle)), port=port, autoscaling=(1, 2), cpus_per_replica=0.5,
            name="auto", route_prefix="/auto/v1")
    try:
        status = serve.status().applications["auto"].deployments["eecompile"]
        assert status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) >= 1
        x = mixed_inputs(2, seed=77)
        code, doc = predict_json(f"http://127.0.0.1:{port}/auto/v1/predict", {"image": x})
        assert code == 200 and doc["exit_index"] == runner.run({"image": x}).exit_index.tolist()
    finally:
        serve.delete("auto")
