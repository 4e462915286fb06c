"""``.npz`` datasets: one array per model input (named after it, samples along its batch axis) and an
optional ``labels`` array.

Dtypes: an array must have the model input's dtype, with two conveniences (each logged as a warning):
a float array of another width is cast (numpy makes float64 by default; float64 -> float32 is what users
almost always mean), and an integer array is cast when every value of its type fits (int32 -> int64).
Anything else (int <-> float, bool, unsigned -> narrower signed) is an error: it usually means the wrong
array. NaN/Inf in float inputs are an error: they would silently flow through every exit.

Imports numpy only: the runtime uses :func:`check_array` on a Jetson.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from eecompile.bundle import TensorInfo
from eecompile.errors import DataError

log = logging.getLogger(__name__)

LABELS = "labels"


def _fixed_dims(info: TensorInfo) -> list[tuple[int, int]]:
    """(axis, size) for every dim of ``info`` with a fixed size, the batch axis excepted."""
    return [(i, d) for i, d in enumerate(info.shape) if isinstance(d, int) and i != info.batch_axis]


def _shape_text(info: TensorInfo) -> str:
    dims = ["B" if i == info.batch_axis else (d if d is not None else "?") for i, d in enumerate(info.shape)]
    return "[" + ", ".join(str(d) for d in dims) + "]"


def check_array(info: TensorInfo, arr: np.ndarray, where: str, cast: bool = False) -> np.ndarray:
    """Check one input array against the model input ``info`` (dtype, rank, fixed dims); return it, cast
    when ``cast`` allows (see the module docstring). ``where`` prefixes the error (a file name or 'feeds')."""
    want = np.dtype(info.dtype)
    if arr.dtype != want:
        ok = cast and (
            (arr.dtype.kind == "f" and want.kind == "f")
            or (arr.dtype.kind in "iu" and want.kind in "iu" and np.can_cast(arr.dtype, want, "safe"))
        )
        if not ok:
            raise DataError(
                f"{where}: array '{info.name}' has dtype {arr.dtype}, the model expects {want}; "
                f"convert it (e.g. x.astype(np.{want}))"
            )
        log.warning("%s: casting array '%s' from %s to %s", where, info.name, arr.dtype, want)
        arr = arr.astype(want)
    if arr.ndim != len(info.shape) or any(arr.shape[i] != d for i, d in _fixed_dims(info)):
        raise DataError(
            f"{where}: array '{info.name}' has shape {list(arr.shape)}, the model expects {_shape_text(info)} "
            f"(B = samples)"
        )
    return arr


def check_finite(info: TensorInfo, arr: np.ndarray, where: str) -> np.ndarray:
    """``arr`` unchanged, or a DataError naming the first sample with a NaN/Inf (float inputs only)."""
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            first = np.argwhere(bad)[0]
            sample = int(first[info.batch_axis]) if info.batch_axis is not None else 0
            raise DataError(f"{where}: array '{info.name}' has {int(bad.sum())} NaN/Inf values (first in sample "
                            f"{sample}); clean the data")
    return arr


def batch_size_of(arrays: dict[str, np.ndarray], inputs: Sequence[TensorInfo], where: str) -> int:
    """The number of samples, checked to agree across inputs; a DataError for none or a disagreement."""
    sizes = {t.name: arrays[t.name].shape[t.batch_axis] for t in inputs if t.batch_axis is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"'{n}': {s}" for n, s in sizes.items())
        raise DataError(f"{where}: arrays disagree on the number of samples ({listed}); give each the same count")
    n = next(iter(sizes.values()), 0)
    if n == 0:
        raise DataError(f"{where}: no samples (the batch axis of {', '.join(sizes) or 'the inputs'} is empty); "
                        f"give at least one sample")
    return int(n)


class Dataset:
    """Model inputs (and optional labels) held in memory, checked against the model."""

    def __init__(self, arrays: dict[str, np.ndarray], inputs: Sequence[TensorInfo],
                 labels: np.ndarray | None = None, source: str = "data") -> None:
        self.arrays = arrays
        self.inputs = list(inputs)
        self.source = source
        self._n = batch_size_of(arrays, self.inputs, source)
        if labels is not None and (labels.ndim == 0 or len(labels) != self._n):
            raise DataError(f"{source}: 'labels' has shape {list(labels.shape)}, expected {self._n} labels "
                            f"(one per sample)")
        self.labels = labels

    def __len__(self) -> int:
        return self._n

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Dicts of input arrays, ``batch_size`` samples each (the last one may be smaller)."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, self._n, batch_size):
            yield self.slice(start, min(start + batch_size, self._n))

    def slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples ``start:stop`` of every input (views, not copies)."""
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            a = self.arrays[t.name]
            if t.batch_axis is None:
                out[t.name] = a
            else:
                index = [slice(None)] * a.ndim
                index[t.batch_axis] = slice(start, stop)
                out[t.name] = a[tuple(index)]
        return out


def load_npz(path: str | Path, inputs: Sequence[TensorInfo]) -> Dataset:
    """Read an .npz whose arrays are named after the model ``inputs`` (plus optional ``labels``)."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise DataError(f"{where}: no such file; give an .npz with arrays named "
                        f"{', '.join(t.name for t in inputs)}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{where}: cannot read it as an .npz ({e}); save inputs with np.savez") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{where}: a single .npy array, not an .npz archive; save with "
                        f"np.savez(path, {', '.join(f'{t.name}=...' for t in inputs)})")
    try:
        with loaded as npz:
            raw = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{where}: the .npz is damaged ({e}); write it again with np.savez") from e

    missing = [t.name for t in inputs if t.name not in raw]
    if missing:
        raise DataError(f"{where}: no array named {', '.join(repr(m) for m in missing)} (a model input); "
                        f"the file has {', '.join(repr(k) for k in raw) or 'no arrays'}")
    extra = [k for k in raw if k != LABELS and k not in {t.name for t in inputs}]
    if extra:
        log.warning("%s: ignoring arrays that are not model inputs: %s", where, ", ".join(extra))
    arrays = {t.name: check_finite(t, check_array(t, raw[t.name], where, cast=True), where) for t in inputs}
    return Dataset(arrays, inputs, labels=raw.get(LABELS), source=where)
