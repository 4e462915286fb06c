"""`/v1/generate` for decoder bundles on a real Ray Serve, with iteration-level batching: concurrent requests of
different lengths each get what the local DecoderRunner greedily generates for that prompt alone; a short request
that arrives while a long one decodes joins the running batch and is answered first; streaming (server-sent
events) gives the same tokens; bad requests get 400 with the CLI's message; the decode metrics are exported."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.serve.client import get, post, stream_events
from tests.serve.conftest import LONG_LENGTH
from tests.serve.test_protocol import GREEDY_TEMPERATURE

pytestmark = pytest.mark.slow


def _generate(url: str, doc: dict) -> tuple[int, dict]:
    status, body, _ = post(url, json.dumps(doc).encode(), "application/json")
    return status, json.loads(body)


@pytest.fixture(scope="module")
def lm_endpoint(long_lm_bundle: Path, ray_serve):
    from ray import serve

    from eecompile.serve.ray_app import ServeOptions, run_app

    port = ray_serve["port"]
    run_app(ServeOptions(bundle=str(long_lm_bundle), backend_options={"threads": 1}, max_batch_size=8),
            port=port, name="lm", route_prefix="/lm/v1")
    yield f"http://127.0.0.1:{port}/lm/v1", ray_serve["metrics_port"]
    serve.delete("lm")


@pytest.fixture(scope="module")
def local(long_lm_bundle: Path):
    from eecompile.runtimes.lm import DecoderRunner

    return DecoderRunner(long_lm_bundle, threads=1)


def _alone(local, doc: dict) -> list[int]:  # noqa: ANN001
    prompt = doc.get("prompt", doc.get("token_ids"))
    res = local.generate([prompt], doc["max_new_tokens"], mode=doc.get("mode", "none"),
                         thresholds=doc.get("thresholds"))
    return [int(t) for t in res.results[0]["token_ids"]]


def test_concurrent_requests_of_different_lengths_match_the_local_decoder(lm_endpoint, local) -> None:
    url, _ = lm_endpoint
    status, body = get(f"{url}/health")
    assert status == 200 and json.loads(body)["route"] == "generate"
    docs = [{"prompt": "hello", "max_new_tokens": 30}, {"prompt": "abc", "max_new_tokens": 3},
            {"token_ids": [5, 6, 7, 8], "max_new_tokens": 17}, {"prompt": "the cat", "max_new_tokens": 8},
            {"prompt": [9, 10], "max_new_tokens": 1}, {"prompt": "zz", "max_new_tokens": 22},
            {"prompt": "hello", "max_new_tokens": 12, "mode": "speculative"},
            {"prompt": "abc", "max_new_tokens": 10, "mode": "exit", "thresholds": ["always"]}]
    with ThreadPoolExecutor(len(docs)) as pool:
        answers = list(pool.map(lambda d: _generate(f"{url}/generate", d), docs))
    shared = 0.0
    for doc, (status, out) in zip(docs, answers, strict=True):
        assert status == 200, out
        assert out["token_ids"] == _alone(local, doc), doc
        assert set(out) >= {"prompt", "token_ids", "text", "finish_reason", "figures"}
        assert out["finish_reason"] in ("eos", "length")
        if "prompt" in doc and isinstance(doc["prompt"], str):
            assert out["prompt"] == doc["prompt"] and out["text"] == local.tokenizer().decode(out["token_ids"])
        f = out["figures"]
        assert 0 <= f["queue_ms"] <= f["time_to_first_token_ms"] <= f["total_ms"] and f["tokens_per_s"] > 0
        shared = max(shared, f["mean_batch_rows"])
    assert shared > 1  # rows decoded together


def test_a_short_request_started_later_is_answered_before_a_long_one(lm_endpoint, local) -> None:
    url, _ = lm_endpoint
    long_doc = {"token_ids": [3], "max_new_tokens": 600, "stream": True}
    got: dict[str, object] = {}
    first = threading.Event()

    def read_long() -> None:
        tokens: list[int] = []
        for ev in stream_events(f"{url}/generate", long_doc):
            assert "error" not in ev, ev
            if ev.get("finished"):
                got["final"], got["done_at"] = ev, time.perf_counter()
            else:
                tokens += ev["token_ids"]
                first.set()
        got["streamed"] = tokens

    reader = threading.Thread(target=read_long)
    reader.start()
    try:
        assert first.wait(60), "the long request produced no token"
        status, short = _generate(f"{url}/generate", {"prompt": "abc", "max_new_tokens": 3})
        short_at = time.perf_counter()
    finally:
        reader.join(120)
    assert status == 200 and short["token_ids"] == _alone(local, {"prompt": "abc", "max_new_tokens": 3})
    final = got["final"]
    assert isinstance(final, dict)
    assert short_at < got["done_at"], "the short request waited for the long one (request-level batching)"
    assert short["figures"]["mean_batch_rows"] >= 2  # it joined the running batch
    want = _alone(local, {"token_ids": [3], "max_new_tokens": 600})
    assert final["token_ids"] == want == got["streamed"] and final["finish_reason"] in ("eos", "length")


def test_a_client_that_closes_its_stream_frees_its_row(lm_endpoint) -> None:
    """The client of a long streamed request disconnects after its first tokens; a request sent next decodes
    alone (had the long row stayed, the two would share every step)."""
    import urllib.request

    url, _ = lm_endpoint
    req = urllib.request.Request(f"{url}/generate", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"token_ids": [3], "max_new_tokens": 600, "stream": True}).encode())
    r = urllib.request.urlopen(req, timeout=60)
    assert r.readline().startswith(b"data: ")
    r.close()
    time.sleep(0.5)  # the proxy sees the disconnect and cancels the replica's stream
    status, out = _generate(f"{url}/generate", {"token_ids": [4], "max_new_tokens": 24})
    assert status == 200 and out["figures"]["mean_batch_rows"] < 1.5, out["figures"]


def test_bad_requests_get_400_with_the_cli_message(lm_endpoint) -> None:
    url, _ = lm_endpoint
    gen = f"{url}/generate"
    status, out = _generate(gen, {"prompt": "hi", "max_new_tokens": 0})
    assert status == 400 and out["error"] == "max_new_tokens: 0; give a positive number of tokens to generate"
    status, out = _generate(gen, {"prompt": "hi", "max_new_tokens": LONG_LENGTH})
    assert status == 400 and out["error"].startswith(f"prompt: 2 tokens + max_new_tokens {LONG_LENGTH} exceed the "
                                                     f"cache ({LONG_LENGTH} positions); shorten the prompt")
    status, out = _generate(gen, {"token_ids": [5, 1000], "max_new_tokens": 2})
    assert status == 400 and "outside the vocabulary" in out["error"]
    status, out = _generate(gen, {"prompt": "hi", "mode": "fast"})
    assert status == 400 and "mode" in out["error"]
    status, out = _generate(gen, {"text": "hi"})
    assert status == 400 and "prompt" in out["error"]
    status, out = _generate(gen, {"prompt": "hi", "max_new_tokens": 2, "temperature": 0.5})  # greedy: refused
    assert status == 400 and out["error"] == GREEDY_TEMPERATURE
    events = list(stream_events(gen, {"prompt": "hi", "max_new_tokens": 0, "stream": True}))
    assert events == [{"status": 400, "error": "max_new_tokens: 0; give a positive number of tokens to generate"}]
    status, body, _ = post(f"{url}/predict", b"{}", "application/json")
    err = json.loads(body)["error"]
    assert status == 400 and "a decoder bundle (kind: decoder)" in err and "/v1/generate" in err
    status, out = _generate(gen, {"prompt": "hi", "max_new_tokens": 2})
    assert status == 200  # the batch is still serving


def test_decode_metrics(lm_endpoint) -> None:
    url, metrics_port = lm_endpoint
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: _generate(f"{url}/generate", {"token_ids": [i + 1], "max_new_tokens": 20}),
                      range(4)))
    names = ("eecompile_generated_tokens", "eecompile_decode_tokens_per_s", "eecompile_decode_occupancy",
             "eecompile_time_to_first_token_ms_bucket", "eecompile_batch_samples_bucket")
    text = ""
    deadline = time.time() + 30
    while time.time() < deadline:
        text = get(f"http://127.0.0.1:{metrics_port}/metrics")[1].decode()
        if all(n in text for n in names):
            break
        time.sleep(1)
    for n in names:
        assert n in text, n
