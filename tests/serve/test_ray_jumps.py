"""A bundle with jump exits (MuE's encoder–decoder, tests/loops/test_jumps.py) behind Ray Serve: ``GET /v1/health``
counts the exits it has (the gateless boundary before the jump target is none), and ``POST /v1/predict`` answers
as the local :class:`~eecompile.runtimes.jumps.JumpRunner` does."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from tests.loops.test_jumps import _feeds
from tests.serve.client import get, post

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def jump_endpoint(tmp_path_factory: pytest.TempPathFactory, ray_serve: dict) -> Any:
    from ray import serve

    import eecompile
    from eecompile.runtimes.jumps import JumpRunner
    from eecompile.serve.ray_app import ServeOptions, run_app
    from tests.loops.models import export_encoder_decoder
    from tests.loops.test_jumps import mue_spec

    d = tmp_path_factory.mktemp("served_mue")
    model, _, names = export_encoder_decoder(d / "encdec.onnx")
    bundle = eecompile.compile_model(mue_spec(d, model, names), d / "mue.eebundle").path
    run_app(ServeOptions(bundle=str(bundle), max_batch_size=16, batch_wait_ms=5), port=ray_serve["port"],
            name="mue", route_prefix="/mue/v1")
    with JumpRunner(bundle) as runner:
        yield f"http://127.0.0.1:{ray_serve['port']}/mue/v1", runner
    serve.delete("mue")


def test_health_counts_the_gated_exits_and_the_final_one(jump_endpoint: Any) -> None:
    """Five segments: two jump exits, the boundary before the jump target (no gate: no exit), the decoder's exit
    and the final one; health used to say 5 exits."""
    url, runner = jump_endpoint
    m = runner.manifest
    assert len(m.segments) == 5 and m.segments[2].exit.gate is None
    status, body = get(f"{url}/health")
    assert status == 200 and json.loads(body)["exits"] == 4 == len(m.thresholds) + 1, body
    feeds = _feeds(4, seed=1)
    thresholds = ["always", "never", "never"]  # one per gated exit: every sample jumps at the first
    status, answer, _ = post(f"{url}/predict", json.dumps({"inputs": {k: v.tolist() for k, v in feeds.items()},
                                                          "thresholds": thresholds}).encode(), "application/json")
    assert status == 200, answer
    doc, local = json.loads(answer), runner.run(feeds, thresholds=thresholds)
    assert doc["jumped"] == local.jumped.tolist() == [0] * 4 and doc["exit_index"] == local.exit_index.tolist()
    np.testing.assert_allclose(np.array(doc["outputs"]["logits"], np.float32), local.outputs["logits"], rtol=1e-4,
                               atol=1e-4)
