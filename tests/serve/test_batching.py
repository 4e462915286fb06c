"""Many requests in one runner call (no Ray): each request gets exactly its own rows back, and a request whose
samples all left at exit 0 is answered before the deeper segments run for the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eecompile.serve.batching import Answer, group_requests, reports_rows, run_group
from eecompile.serve.protocol import PredictRequest
from tests.serve.conftest import mixed_inputs


@pytest.fixture(scope="module")
def runner(served_bundle: Path):
    import eecompile

    with eecompile.load(served_bundle) as r:
        yield r


def _request(x: np.ndarray, thresholds=None) -> PredictRequest:
    return PredictRequest({"image": x}, int(x.shape[0]), thresholds, as_npz=False)


def test_each_request_gets_its_own_rows(runner) -> None:
    xs = [mixed_inputs(n, seed=200 + n) for n in (3, 1, 5, 2)]
    answers: dict[int, Answer] = {}
    run_group(runner, [_request(x) for x in xs], lambda i, a: answers.__setitem__(i, a))
    assert sorted(answers) == [0, 1, 2, 3]
    for i, x in enumerate(xs):
        want = runner.run({"image": x})
        np.testing.assert_array_equal(answers[i].exit_index, want.exit_index)
        np.testing.assert_allclose(answers[i].outputs["logits"], want.outputs["logits"], rtol=1e-4, atol=1e-5)


def test_requests_with_other_thresholds_do_not_share_a_call(runner) -> None:
    x = mixed_inputs(2)
    reqs = [_request(x), _request(x, ("never", "never")), _request(x), _request(x, ("never", "never"))]
    assert group_requests(reqs, runner.inputs) == [[0, 2], [1, 3]]


def test_an_easy_request_is_answered_before_the_deep_segments_run(runner) -> None:
    if not reports_rows(runner):
        pytest.skip("this runner cannot report rows as they exit (no on_exit parameter)")
    x = mixed_inputs(48, seed=9)
    exit_index = runner.run({"image": x}).exit_index
    easy, hard = x[exit_index == 0], x[exit_index == 2]
    assert len(easy) and len(hard)
    calls: list[int] = []
    backend = runner.backend
    original = backend.run_segment

    def counting(index, feeds, threshold):  # noqa: ANN001, ANN202
        calls.append(index)
        return original(index, feeds, threshold)

    done_after: dict[int, list[int]] = {}
    backend.run_segment = counting
    try:
        run_group(runner, [_request(hard), _request(easy)], lambda i, a: done_after.__setitem__(i, list(calls)))
    finally:
        del backend.run_segment
    assert done_after[1] == [0]  # the easy request: answered after segment 0 only
    assert done_after[0] == [0, 1, 2]
