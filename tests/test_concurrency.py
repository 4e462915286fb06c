"""One EarlyExitRunner shared by 8 threads (500 calls each, mixed batch sizes, policies and thresholds) gives
exactly the results of the same calls made one after another on one thread."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from eecompile.runtimes.chain import EarlyExitRunner, RunResult
from tests.bad_inputs.util import D, make_workspace

THREADS, CALLS = 8, 500
SIZES = (1, 2, 3, 5, 8, 13, 32)
SETTINGS = [(None, "compact"), ([0.3, 0.4], "compact"), ([0.3, 0.4], "wait-all"), (["never", 0.35], "compact"),
            ("never", "never")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("conc") / "ws") / "b.eebundle"


def _same(a: RunResult, b: RunResult) -> bool:
    return (np.array_equal(a.exit_index, b.exit_index) and np.array_equal(a.exit_counts, b.exit_counts)
            and np.array_equal(a.nonfinite_counts, b.nonfinite_counts)
            and all(np.array_equal(a.outputs[k], b.outputs[k]) for k in a.outputs))


def test_threads_get_the_single_threaded_results(bundle: Path) -> None:
    runner = EarlyExitRunner(bundle, threads=1)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((SIZES[i % len(SIZES)], D)).astype(np.float32) * 2 for i in range(21)]
    cases = [(b, s) for b in range(len(batches)) for s in range(len(SETTINGS))]
    expected = {}
    for b, s in cases:
        thr, policy = SETTINGS[s]
        expected[b, s] = runner.run({"x": batches[b]}, thresholds=thr, policy=policy)
    # The settings really differ (otherwise a mix-up between calls could not show).
    assert len({tuple(expected[0, s].exit_index) for s in range(len(SETTINGS))}) > 1
    assert len({int(r.exit_counts[0]) for r in expected.values()}) > 1

    failures: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        order = np.random.default_rng(100 + t).integers(0, len(cases), CALLS)
        start.wait()
        try:
            for i in order:
                b, s = cases[i]
                thr, policy = SETTINGS[s]
                got = runner.run({"x": batches[b]}, thresholds=thr, policy=policy)
                if not _same(got, expected[b, s]):
                    failures.append(f"thread {t}: batch {b} (size {len(batches[b])}) settings {SETTINGS[s]}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert not failures, f"{len(failures)} of {THREADS * CALLS} calls differed, e.g. {failures[:3]}"
