"""Bad calls to the Python runtime API: our error type, a message naming the argument and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eecompile.errors import BackendError, DataError, SpecError
from eecompile.runtimes.chain import EarlyExitRunner
from tests.bad_inputs.util import D


@pytest.fixture(scope="module")
def runner(base_workspace: Path) -> EarlyExitRunner:
    return EarlyExitRunner(base_workspace / "b.eebundle", threads=1)


def _x(n: int = 3) -> np.ndarray:
    return np.ones((n, D), np.float32)


def test_feeds_missing_an_input(runner: EarlyExitRunner) -> None:
    with pytest.raises(DataError, match=r"missing \['x'\].*model's inputs are \['x'\]"):
        runner.run({"input": _x()})


def test_feeds_with_the_wrong_shape(runner: EarlyExitRunner) -> None:
    with pytest.raises(DataError, match=r"'x' has shape \[3, 5\], the model expects \[B, 8\]"):
        runner.run({"x": np.ones((3, 5), np.float32)})


def test_feeds_with_the_wrong_dtype(runner: EarlyExitRunner) -> None:
    with pytest.raises(DataError, match=r"'x' has dtype float64, the model expects float32; convert it"):
        runner.run({"x": np.ones((3, D))})


def test_thresholds_of_the_wrong_count(runner: EarlyExitRunner) -> None:
    with pytest.raises(SpecError, match="got 3 values for 2 early exits; give one per exit"):
        runner.run({"x": _x()}, thresholds=[0.5, 0.5, 0.5])


def test_nan_threshold(runner: EarlyExitRunner) -> None:
    with pytest.raises(SpecError, match=r"thresholds\[1\]: NaN"):
        runner.run({"x": _x()}, thresholds=[0.5, float("nan")])


def test_unknown_policy(runner: EarlyExitRunner) -> None:
    with pytest.raises(SpecError, match="policy 'fastest' is not one of compact, wait-all, never"):
        runner.run({"x": _x()}, policy="fastest")


def test_unknown_backend_option(base_workspace: Path) -> None:
    with pytest.raises(BackendError, match="unknown option.*thredas.*known: threads"):
        EarlyExitRunner(base_workspace / "b.eebundle", thredas=2)
