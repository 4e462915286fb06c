"""load_npz: clear errors for every way an .npz can fail to fit the model; batching."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from eecompile.bundle import TensorInfo
from eecompile.errors import DataError
from eecompile.runtimes.data import Dataset, load_npz

INPUTS = [TensorInfo("x", "float32", ["B", 3, "T"], 0), TensorInfo("ids", "int64", ["B", 2], 0)]


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return p


def _good(n: int = 10) -> dict[str, np.ndarray]:
    return {"x": np.ones((n, 3, 5), np.float32), "ids": np.zeros((n, 2), np.int64)}


def test_load_and_batch(tmp_path: Path) -> None:
    ds = load_npz(_npz(tmp_path, **_good(10), labels=np.arange(10)), INPUTS)
    assert len(ds) == 10 and ds.labels is not None and ds.labels.tolist() == list(range(10))
    batches = list(ds.batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert set(batches[0]) == {"x", "ids"}
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), ds.arrays["ids"])
    with pytest.raises(DataError, match="batch size"):
        list(ds.batches(0))


def test_no_labels(tmp_path: Path) -> None:
    assert load_npz(_npz(tmp_path, **_good()), INPUTS).labels is None


def test_float64_is_cast_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    arrays = _good()
    arrays["x"] = arrays["x"].astype(np.float64)
    arrays["ids"] = arrays["ids"].astype(np.int32)
    with caplog.at_level(logging.WARNING):
        ds = load_npz(_npz(tmp_path, **arrays), INPUTS)
    assert ds.arrays["x"].dtype == np.float32 and ds.arrays["ids"].dtype == np.int64
    assert "casting array 'x' from float64 to float32" in caplog.text


@pytest.mark.parametrize("dtype", [np.float32, np.uint64, np.bool_])
def test_int_float_mismatch_is_an_error(tmp_path: Path, dtype: type) -> None:
    arrays = _good()
    arrays["ids"] = arrays["ids"].astype(dtype)
    with pytest.raises(DataError, match=f"array 'ids' has dtype {np.dtype(dtype)}, the model expects int64"):
        load_npz(_npz(tmp_path, **arrays), INPUTS)


def test_missing_array_lists_what_the_file_has(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no array named 'ids'.*the file has 'x', 'labels'"):
        load_npz(_npz(tmp_path, x=_good()["x"], labels=np.zeros(10)), INPUTS)


def test_wrong_shape(tmp_path: Path) -> None:
    arrays = _good()
    arrays["x"] = np.ones((10, 4, 5), np.float32)
    with pytest.raises(DataError, match=r"'x' has shape \[10, 4, 5\], the model expects \[B, 3, T\]"):
        load_npz(_npz(tmp_path, **arrays), INPUTS)
    arrays["x"] = np.ones((10, 3), np.float32)
    with pytest.raises(DataError, match="'x' has shape"):
        load_npz(_npz(tmp_path, **arrays), INPUTS)


def test_inconsistent_sample_counts(tmp_path: Path) -> None:
    arrays = _good()
    arrays["ids"] = arrays["ids"][:7]
    with pytest.raises(DataError, match="disagree on the number of samples.*'x': 10, 'ids': 7"):
        load_npz(_npz(tmp_path, **arrays), INPUTS)
    with pytest.raises(DataError, match="'labels' has shape"):
        load_npz(_npz(tmp_path, **_good(), labels=np.zeros(9)), INPUTS)


def test_zero_samples(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no samples"):
        load_npz(_npz(tmp_path, **_good(0)), INPUTS)


def test_nan_and_inf(tmp_path: Path) -> None:
    arrays = _good()
    arrays["x"][6, 1, 2] = np.nan
    arrays["x"][8, 0, 0] = np.inf
    with pytest.raises(DataError, match="'x' has 2 NaN/Inf values \\(first in sample 6\\)"):
        load_npz(_npz(tmp_path, **arrays), INPUTS)


def test_not_an_npz(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "missing.npz", INPUTS)
    text = tmp_path / "t.npz"
    text.write_text("hello")
    with pytest.raises(DataError, match="cannot read it as an .npz"):
        load_npz(text, INPUTS)
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match="single .npy array"):
        load_npz(npy, INPUTS)


def test_dataset_slices_respect_batch_axis() -> None:
    inputs = [TensorInfo("s", "float32", [4, "B"], 1), TensorInfo("c", "float32", [1, 2], None)]
    ds = Dataset({"s": np.zeros((4, 6), np.float32), "c": np.ones((1, 2), np.float32)}, inputs)
    assert len(ds) == 6
    b = next(ds.batches(4))
    assert b["s"].shape == (4, 4) and b["c"].shape == (1, 2)
