"""Bad .npz data: exit 1, one line naming the file, the array and what to do; no output written."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eecompile.errors import DataError
from tests.bad_inputs.util import D, expect_error


def _run(ws: Path, data: Path) -> list:
    return ["run", ws / "b.eebundle", "--data", data, "-o", ws / "out.npz"]


def _npz(ws: Path, **arrays: np.ndarray) -> Path:
    np.savez(ws / "bad.npz", **arrays)
    return ws / "bad.npz"


def _x(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)


def test_npz_missing_the_model_input(ws: Path) -> None:
    expect_error(_run(ws, _npz(ws, inputs=_x())), DataError, "bad.npz", "no array named 'x'", "'inputs'",
                 workspace=ws)


def test_npz_with_the_wrong_dtype(ws: Path) -> None:
    expect_error(_run(ws, _npz(ws, x=np.ones((6, D), np.int32))), DataError, "bad.npz", "'x'", "int32",
                 "float32", "astype", workspace=ws)


def test_npz_with_the_wrong_rank(ws: Path) -> None:
    expect_error(_run(ws, _npz(ws, x=_x()[:, :, None])), DataError, "bad.npz", "'x'", "[6, 8, 1]", "[B, 8]",
                 workspace=ws)


def test_npz_with_the_wrong_feature_size(ws: Path) -> None:
    expect_error(_run(ws, _npz(ws, x=_x()[:, :5])), DataError, "bad.npz", "'x'", "[6, 5]", "[B, 8]",
                 workspace=ws)


def test_npz_with_zero_samples(ws: Path) -> None:
    expect_error(_run(ws, _npz(ws, x=np.zeros((0, D), np.float32))), DataError, "bad.npz", "no samples", "at least one sample",
                 workspace=ws)


def test_npz_with_nan(ws: Path) -> None:
    x = _x()
    x[4, 3] = np.nan
    expect_error(_run(ws, _npz(ws, x=x)), DataError, "bad.npz", "'x'", "NaN/Inf", "sample 4", "clean the data",
                 workspace=ws)


def test_npz_with_inf(ws: Path) -> None:
    x = _x()
    x[2, 0] = -np.inf
    expect_error(_run(ws, _npz(ws, x=x)), DataError, "bad.npz", "'x'", "NaN/Inf", "sample 2", workspace=ws)


def test_data_that_is_not_an_npz(ws: Path) -> None:
    (ws / "bad.npz").write_text("a,b,c\n1,2,3\n")
    expect_error(_run(ws, ws / "bad.npz"), DataError, "bad.npz", "np.savez", workspace=ws)


def test_data_that_is_a_single_npy(ws: Path) -> None:
    np.save(ws / "x.npy", _x())
    expect_error(_run(ws, ws / "x.npy"), DataError, "x.npy", "not an .npz", "np.savez", workspace=ws)


def test_data_file_missing(ws: Path) -> None:
    expect_error(_run(ws, ws / "nope.npz"), DataError, "nope.npz", "no such file", "arrays named x",
                 workspace=ws)


def test_labels_of_the_wrong_length_for_calibrate(ws: Path) -> None:
    data = _npz(ws, x=_x(6), labels=np.zeros(5, np.int64))
    expect_error(["calibrate", ws / "b.eebundle", "--data", data, "--max-drop", "0.05"], DataError, "bad.npz",
                 "labels", "one per sample", workspace=ws)
