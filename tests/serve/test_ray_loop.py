"""A loop bundle behind Ray Serve: the DDIM sampler of tests/loops (a denoiser with a layer exit, the DDIM update as
the step graph, a change gate) answers ``POST /v1/predict`` with each request's own ``steps`` and
``loop_threshold``, as the local :class:`~eecompile.runtimes.loop.LoopRunner` does for that request alone."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.loops.test_denoiser_loop import STEPS  # the bundle's loop.steps
from tests.serve.client import get, post

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loop_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import eecompile
    from tests.loops.models import export_ddim_step, export_denoiser
    from tests.loops.test_denoiser_loop import loop_spec

    d = tmp_path_factory.mktemp("served_loop")
    return eecompile.compile_model(loop_spec(d, export_denoiser(d / "denoiser.onnx"),
                                             export_ddim_step(d / "ddim.onnx")), d / "ddim.eebundle").path


@pytest.fixture(scope="module")
def loop_endpoint(loop_bundle: Path, ray_serve: dict) -> Any:
    from ray import serve

    from eecompile.runtimes.loop import LoopRunner
    from eecompile.serve.ray_app import ServeOptions, run_app

    bundle = loop_bundle
    port = ray_serve["port"]
    run_app(ServeOptions(bundle=str(bundle), max_batch_size=16, batch_wait_ms=50), port=port, name="loop",
            route_prefix="/loop/v1")
    with LoopRunner(bundle) as runner:
        yield f"http://127.0.0.1:{port}/loop/v1", runner
    serve.delete("loop")


def _noise(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)  # different scales converge at different steps
    return (rng.standard_normal((n, 3, 8, 8)) * rng.uniform(0.3, 3.0, n)[:, None, None, None]).astype(np.float32)


def _post(url: str, x: np.ndarray, **fields: Any) -> tuple[int, dict[str, Any]]:
    status, body, _ = post(f"{url}/predict", json.dumps({"inputs": {"x": x.tolist()}, **fields}).encode(),
                           "application/json")
    return status, json.loads(body)


def test_loop_requests_run_their_own_steps_and_loop_threshold(loop_endpoint: Any) -> None:
    """Concurrent requests with different steps and loop thresholds (gathered into the same batches, run in one call
    per setting): each answer is the local loop's on that request alone, results and steps."""
    url, runner = loop_endpoint
    status, body = get(f"{url}/health")
    assert status == 200 and json.loads(body)["inputs"] == ["x"]  # t, t_next: fed per step
    cases = [({}, 2), ({"steps": 5}, 1), ({}, 3), ({"steps": 5}, 2), ({"steps": 12, "loop_threshold": 0.05}, 2),
             ({"loop_threshold": "never"}, 1), ({"steps": 5}, 1), ({}, 1)]
    xs = [_noise(n, seed=i) for i, (_, n) in enumerate(cases)]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda c: _post(url, c[1], **c[0][0]), zip(cases, xs, strict=True)))
    taken = []
    for (fields, _), x, (status, doc) in zip(cases, xs, answers, strict=True):
        assert status == 200, doc
        local = runner.run({"x": x}, **fields)
        assert doc["steps"] == local.steps.tolist(), (fields, doc["steps"])
        assert "exit_index" not in doc and set(doc["outputs"]) == {"x_next", "x0"}
        for name in ("x_next", "x0"):
            np.testing.assert_allclose(np.array(doc["outputs"][name], np.float32), local.outputs[name],
                                       rtol=1e-4, atol=1e-4)
        if fields.get("loop_threshold") == "never":
            assert doc["steps"] == [STEPS] * len(x)
        taken += [(fields.get("steps", STEPS), s) for s in doc["steps"]]
    assert any(s < n for n, s in taken)  # the gate stopped some samples early


def test_loop_npz_request_and_bad_loop_requests(loop_endpoint: Any) -> None:
    url, runner = loop_endpoint
    x = _noise(3, seed=9)
    buf = io.BytesIO()
    np.savez(buf, x=x, steps=np.array(6), loop_threshold=np.array("always"))
    status, body, ctype = post(f"{url}/predict", buf.getvalue(), "application/octet-stream")
    assert status == 200 and ctype.startswith("application/octet-stream")
    with np.load(io.BytesIO(body)) as out:
        assert out["steps"].tolist() == [1, 1, 1] and "exit_index" not in out.files
        np.testing.assert_allclose(out["x0"], runner.run({"x": x}, steps=6, loop_threshold="always").outputs["x0"],
                                   rtol=1e-4, atol=1e-4)
    for fields, message in [
        ({"steps": 0}, "request: steps is 0; expected a positive integer"),
        ({"loop_threshold": -1}, "loop_threshold: threshold -1 is outside [0, inf] for gate kind 'change'"),
        ({"loop_threshold": [0.1, -0.5]}, "loop_threshold[1]: threshold -0.5 is outside [0, inf]"),
    ]:
        status, doc = _post(url, x, **fields)
        assert status == 400 and doc["error"].startswith(message), doc
    status, body, _ = post(f"{url}/predict", json.dumps({"inputs": {"x": x.tolist(), "t": [0.5] * 3}}).encode(),
                           "application/json")
    assert status == 400 and "'t'" in json.loads(body)["error"], body


def test_steps_are_bounded_by_max_steps(loop_endpoint: Any, loop_bundle: Path) -> None:
    """One request cannot hold a replica for an unbounded number of steps: by default at most 4 x the bundle's
    loop.steps (GET /v1/health says how many), more is a 400 naming the limit and the option that sets it."""
    url, _ = loop_endpoint
    status, body = get(f"{url}/health")
    assert status == 200 and json.loads(body)["max_steps"] == 4 * STEPS
    status, doc = _post(url, _noise(1, seed=3), steps=4 * STEPS + 1)
    assert status == 400 and doc["error"] == (f"request: steps is {4 * STEPS + 1}; this endpoint runs at most "
                                              f"{4 * STEPS} steps per request (serve --max-steps); ask for fewer"), doc
    # A limit below the bundle's own loop.steps (what a request without steps runs) ends `serve` before it starts.
    from click.testing import CliRunner

    from eecompile.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(loop_bundle), "--max-steps", str(STEPS - 1)])
    assert r.exit_code == 1 and (f"--max-steps {STEPS - 1} is below the bundle's loop.steps ({STEPS}), which a "
                                 f"request that gives no steps runs; give --max-steps {STEPS} or more") in r.output, \
        r.output
