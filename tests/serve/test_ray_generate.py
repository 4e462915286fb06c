"""`/v1/generate` for decoder bundles on Ray Serve: concurrent prompts batched into one decode call answer what
the local DecoderRunner answers for each prompt alone (greedy); bad requests get 400."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.lm.conftest import lm_bundle, lm_dir  # noqa: F401  (the tiny Llama decoder bundle, built once)
from tests.serve.client import get, post

pytestmark = pytest.mark.slow


def _generate(url: str, doc: dict) -> tuple[int, dict]:
    status, body, _ = post(url, json.dumps(doc).encode(), "application/json")
    return status, json.loads(body)


@pytest.fixture(scope="module")
def lm_endpoint(lm_bundle: Path, ray_serve):  # noqa: F811
    from ray import serve

    from eecompile.serve.ray_app import ServeOptions, run_app

    port = ray_serve["port"]
    run_app(ServeOptions(bundle=str(lm_bundle), backend_options={"threads": 1}, max_batch_size=8,
                         batch_wait_ms=100), port=port, name="lm", route_prefix="/lm/v1")
    yield f"http://127.0.0.1:{port}/lm/v1"
    serve.delete("lm")


def test_generate_matches_the_local_decoder(lm_endpoint, lm_bundle) -> None:  # noqa: F811
    from eecompile.runtimes.lm import DecoderRunner

    status, body = get(f"{lm_endpoint}/health")
    assert status == 200 and json.loads(body)["route"] == "generate"
    prompts = ["hello", "abc", "the cat", [5, 6, 7, 8], "zz", [9, 10]]
    docs = [{"prompt": p, "max_new_tokens": 6} for p in prompts] + [
        {"prompt": "hello", "max_new_tokens": 6, "mode": "speculative"},
        {"prompt": "abc", "max_new_tokens": 6, "mode": "exit", "thresholds": ["always"]}]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda d: _generate(f"{lm_endpoint}/generate", d), docs))
    local = DecoderRunner(lm_bundle, threads=1)
    batched = 0
    for doc, (status, out) in zip(docs, answers, strict=True):
        assert status == 200, out
        want = local.generate([doc["prompt"]], doc["max_new_tokens"], mode=doc.get("mode", "none"),
                              thresholds=doc.get("thresholds")).results[0]
        assert out["token_ids"] == [int(t) for t in want["token_ids"]], doc
        batched = max(batched, out["batch"]["rows"])
    assert batched > 1  # concurrent prompts shared a decode call


def test_generate_bad_requests(lm_endpoint) -> None:
    url = f"{lm_endpoint}/generate"
    status, out = _generate(url, {"prompt": "hi", "max_new_tokens": 0})
    assert status == 400 and "max_new_tokens" in out["error"]
    status, out = _generate(url, {"prompt": "hi", "mode": "fast"})
    assert status == 400 and "mode" in out["error"]
    status, out = _generate(url, {"text": "hi"})
    assert status == 400 and "prompt" in out["error"]
    status, body, _ = post(f"{lm_endpoint}/predict", b"{}", "application/json")
    assert status == 404 and "/generate" in json.loads(body)["error"]
