"""A decoder bundle on a real tritonserver as a decoupled Python model: concurrent gRPC streams of different
lengths each get what the local DecoderRunner greedily generates for that prompt alone, streamed step by step;
a short request sent while a long one decodes finishes first (its row joined the running batch); a bad request
gets one error response naming the problem."""

from __future__ import annotations

import json
import queue
import time

import numpy as np
import pytest

from tests.serve.conftest import LONG_LENGTH, free_ports
from tests.serve.triton_env import TritonServer, triton_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(long_lm_bundle, tmp_path_factory):
    from click.testing import CliRunner

    from eecompile.cli import cli

    env = triton_env()
    tmp = tmp_path_factory.mktemp("triton_lm")
    repo = tmp / "repo"
    result = CliRunner().invoke(cli, ["export", "triton", str(long_lm_bundle), "-o", str(repo), "--name", "lm",
                                      "--max-batch-size", "4", "--threads", "1"])
    assert result.exit_code == 0 and "decoupled" in result.output, result.output
    cfg = (repo / "lm" / "config.pbtxt").read_text()
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    parsed = text_format.Parse(cfg, model_config_pb2.ModelConfig())  # Triton's own schema
    assert parsed.model_transaction_policy.decoupled and parsed.backend == "python"
    with TritonServer(env, repo, free_ports(3), tmp / "triton.log") as s:
        yield s


@pytest.fixture(scope="module")
def local(long_lm_bundle):
    from eecompile.runtimes.lm import DecoderRunner

    return DecoderRunner(long_lm_bundle, threads=1)


def _inputs(grpcclient, prompt, max_new: int) -> list:  # noqa: ANN001
    if isinstance(prompt, str):
        p = grpcclient.InferInput("prompt", [1], "BYTES")
        p.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    else:
        p = grpcclient.InferInput("token_ids", [len(prompt)], "INT64")
        p.set_data_from_numpy(np.asarray(prompt, np.int64))
    n = grpcclient.InferInput("max_new_tokens", [1], "INT32")
    n.set_data_from_numpy(np.array([max_new], np.int32))
    return [p, n]


class Streams:
    """One gRPC stream carrying several requests; responses sorted by request id, with arrival times."""

    def __init__(self, server: TritonServer) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error, time.perf_counter())))

    def send(self, rid: str, prompt, max_new: int, **params) -> None:  # noqa: ANN001
        self.client.async_stream_infer("lm", _inputs(self.grpc, prompt, max_new), request_id=rid,
                                       parameters=params or None, enable_empty_final_response=False)

    def collect(self, n_requests: int, timeout: float = 120) -> dict[str, dict]:
        out: dict[str, dict] = {}
        deadline = time.time() + timeout
        while sum(1 for v in out.values() if v.get("done")) < n_requests and time.time() < deadline:
            result, error, at = self.events.get(timeout=max(0.1, deadline - time.time()))
            if error is not None:  # an error response carries no request id here: one entry per error
                out.setdefault(f"error{len(out)}", {"error": str(error), "done": True, "at": at})
                continue
            rid = result.get_response().id
            row = out.setdefault(rid, {"streamed": [], "done": False})
            if result.as_numpy("finished")[0]:
                row.update(done=True, at=at, final=result.as_numpy("output_ids").tolist(),
                           result=json.loads(result.as_numpy("result")[0].decode()))
            else:
                row["streamed"] += result.as_numpy("output_ids").tolist()
        return out

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def test_concurrent_streams_match_the_local_decoder(server, local) -> None:
    work = {"a": ("hello", 20), "b": ([5, 6, 7], 4), "c": ("the cat", 33), "d": ([9], 1), "e": ("zz", 12),
            "f": ("abc", 9)}
    s = Streams(server)
    try:
        for rid, (p, n) in work.items():
            s.send(rid, p, n)
        s.send("spec", "hello", 10, mode="speculative", thresholds="0.3")
        s.send("exit", "abc", 6, mode="exit", thresholds="always")
        got = s.collect(len(work) + 2)
    finally:
        s.close()
    assert set(got) == {*work, "spec", "exit"}, got
    assert got["spec"]["final"] == local.generate(["hello"], 10, mode="speculative", thresholds=[0.3]
                                                  ).results[0]["token_ids"]
    assert got["exit"]["final"] == local.generate(["abc"], 6, mode="exit", thresholds=["always"]
                                                  ).results[0]["token_ids"]
    for rid, (p, n) in work.items():
        want = local.generate([p], n).results[0]
        row = got[rid]
        assert row["final"] == want["token_ids"] == row["streamed"], rid
        assert row["result"]["text"] == want["text"] and row["result"]["finish_reason"] in ("eos", "length")
    assert max(r["result"]["figures"]["mean_batch_rows"] for r in got.values()) > 1


def test_a_short_request_sent_later_finishes_first(server, local) -> None:
    s = Streams(server)
    try:
        s.send("long", [3], 600)
        first = s.events.get(timeout=60)  # the long one is decoding
        assert first[1] is None and not first[0].as_numpy("finished")[0]
        s.send("short", "abc", 3)
        got = s.collect(2)
    finally:
        s.close()
    got["long"]["streamed"] = first[0].as_numpy("output_ids").tolist() + got["long"]["streamed"]
    assert got["short"]["at"] < got["long"]["at"]
    assert got["short"]["final"] == local.generate(["abc"], 3).results[0]["token_ids"]
    assert got["long"]["final"] == local.generate([[3]], 600).results[0]["token_ids"] == got["long"]["streamed"]


def test_a_cancelled_stream_frees_its_row(server) -> None:
    """The client cancels a long request after its first tokens; a request sent next decodes alone (had the
    long row stayed, the two would share every step)."""
    s = Streams(server)
    s.send("long", [3], 600)
    first = s.events.get(timeout=60)
    assert first[1] is None and not first[0].as_numpy("finished")[0]
    s.client.stop_stream(cancel_requests=True)
    s.client.close()
    s = Streams(server)
    try:
        s.send("next", [4], 24)
        got = s.collect(1)
    finally:
        s.close()
    # dropped at a step boundary: at most a step or two shared with the long row, not all 24
    assert got["next"]["result"]["figures"]["mean_batch_rows"] < 1.5, got["next"]["result"]


def test_bad_request_gets_one_error(server) -> None:
    s = Streams(server)
    try:
        s.send("bad", "hi", LONG_LENGTH)
        got = s.collect(1, timeout=30)
    finally:
        s.close()
    (row,) = got.values()
    assert f"exceed the cache ({LONG_LENGTH} positions)" in row["error"], row
