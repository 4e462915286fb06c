"""``.npz`` datasets: one array per model input (named after it, samples along its batch axis) and an
optional ``labels`` array.

Dtypes: an array must have the model input's dtype, with two conveniences (each logged as a warning):
a float array of another width is cast (numpy makes float64 by default; float64 -> float32 is what users
almost always mean), and an integer array is cast when every value of its type fits (int32 -> int64).
Anything else (int <-> float, bool, unsigned -> narrower signed) is an error: it usually means the wrong
array. NaN/Inf in float inputs are an error: they would silently flow through every exit.

Bounds: an .npz is checked against its ``.npy`` headers before any data is read (:func:`inspect_npz`: the
declared size must match the zip entry), arrays stored uncompressed (``np.savez``) are memory-mapped, and what
must be held in memory (compressed arrays, casts) is capped (:func:`max_input_bytes`, 8 GiB unless
``EECOMPILE_MAX_INPUT_BYTES`` or ``--max-input-bytes`` says otherwise). :class:`NpzBatches` and
:class:`NpzWriter` read and write batch by batch, for runs whose memory stays flat in the number of rows.

Imports numpy only: the runtime uses :func:`check_array` on a Jetson.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    when ``cast`` allows (see the module docstring). ``where`` prefixes the error (a file name or 'feeds').
    A float cast that overflows (1e300 as float32) is a DataError naming the array and the first sample."""
    check_dtype_and_shape(info, arr.dtype, arr.shape, where, cast)
    want = np.dtype(info.dtype)
    if arr.dtype != want:
        log.warning("%s: casting array '%s' from %s to %s", where, info.name, arr.dtype, want)
        arr = cast_array(info, arr, where)
    return arr


def check_dtype_and_shape(info: TensorInfo, dtype: np.dtype, shape: tuple[int, ...], where: str,
                          cast: bool = False) -> None:
    """The checks of :func:`check_array` that need only an array's dtype and shape (e.g. from an .npy
    header, before any data is read). Raises DataError naming the array, what it has and what is expected."""
    want = np.dtype(info.dtype)
    if dtype != want:
        ok = cast and (
            (dtype.kind == "f" and want.kind == "f")
            or (dtype.kind in "iu" and want.kind in "iu" and np.can_cast(dtype, want, "safe"))
        )
        if not ok:
            raise DataError(
                f"{where}: array '{info.name}' has dtype {dtype}, the model expects {want}; "
                f"convert it (e.g. x.astype(np.{want}))"
            )
    if len(shape) != len(info.shape) or any(shape[i] != d for i, d in _fixed_dims(info)):
        raise DataError(
            f"{where}: array '{info.name}' has shape {list(shape)}, the model expects {_shape_text(info)} "
            f"(B = samples)"
        )


def cast_array(info: TensorInfo, arr: np.ndarray, where: str) -> np.ndarray:
    """``arr`` as ``info.dtype``; a float value that overflows the narrower type is a DataError (not a NaN/Inf
    "in the data": the data was finite)."""
    want = np.dtype(info.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(want)
    if arr.dtype.kind == "f" and want.kind == "f" and want.itemsize < arr.dtype.itemsize:
        overflow = np.isinf(out) & np.isfinite(arr)
        if overflow.any():
            first = np.argwhere(overflow)[0]
            sample = int(first[info.batch_axis]) if info.batch_axis is not None else 0
            big = float(np.abs(arr[tuple(first)]))
            raise DataError(f"{where}: overflow while casting {arr.dtype} to {want}: array '{info.name}' has "
                            f"{int(overflow.sum())} values beyond {want}'s range (first in sample {sample}: "
                            f"{big:.3g}); scale or clip the data, or save it as {want}")
    return out


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


def take_samples(a: np.ndarray, rows: slice | np.ndarray, axis: int | None) -> np.ndarray:
    """Samples ``rows`` of one input array along its batch ``axis`` (a view for a slice, a copy for an index array);
    an input without a batch axis
    (``None``: a flag, a table) is returned as given."""
    if axis is None:
        return a
    index: list[slice | np.ndarray] = [slice(None)] * a.ndim
    index[axis] = rows
    return a[tuple(index)]


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
        return {t.name: take_samples(self.arrays[t.name], slice(start, stop), t.batch_axis) for t in self.inputs}


# ------------------------------------------------------------------------------------------ reading .npz

MAX_INPUT_BYTES = 8 << 30  # arrays held in memory at once (compressed members and casts); mapped ones are free
ENV_MAX_INPUT_BYTES = "EECOMPILE_MAX_INPUT_BYTES"


def max_input_bytes(override: int | None = None) -> int:
    """The cap on input bytes held in memory: ``override``, else ``EECOMPILE_MAX_INPUT_BYTES``, else 8 GiB."""
    if override is not None:
        return int(override)
    raw = os.environ.get(ENV_MAX_INPUT_BYTES, "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else MAX_INPUT_BYTES


@dataclass
class NpzMember:
    """One array of an .npz as its ``.npy`` header declares it, checked against the zip entry's size."""

    name: str
    zinfo: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    header_bytes: int  # magic + header, before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def stored(self) -> bool:
        """Uncompressed (np.savez, not savez_compressed): the data can be memory-mapped."""
        return self.zinfo.compress_type == zipfile.ZIP_STORED


def _size(n: int) -> str:
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def inspect_npz(zf: zipfile.ZipFile, where: str) -> dict[str, NpzMember]:
    """Every array of an open .npz, from its header alone (no data read). Raises DataError for a member
    that is not a plain .npy (pickled objects, encryption) or whose header declares more or less data than
    the entry holds (a damaged or forged file)."""
    members: dict[str, NpzMember] = {}
    for zi in zf.infolist():
        if zi.is_dir():
            continue
        name = zi.filename[:-4] if zi.filename.endswith(".npy") else zi.filename
        if zi.flag_bits & 0x1:
            raise DataError(f"{where}: array '{name}' is encrypted; save inputs with np.savez")
        try:
            with zf.open(zi) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                header = f.tell()
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as e:
            raise DataError(f"{where}: array '{name}' is not a readable .npy ({e}); write it again with "
                            f"np.savez") from e
        if dtype.hasobject:
            raise DataError(f"{where}: array '{name}' holds Python objects (dtype {dtype}), which are not "
                            f"loaded (they would need pickle); save numeric arrays")
        m = NpzMember(name, zi, dtype, tuple(int(d) for d in shape), bool(fortran), header)
        if zi.file_size != header + m.nbytes:
            raise DataError(f"{where}: array '{name}' declares shape {list(m.shape)} {dtype} "
                            f"({_size(m.nbytes)}) but its entry holds {_size(max(zi.file_size - header, 0))}; "
                            f"the file is damaged or forged: write it again with np.savez")
        members[name] = m
    return members


def _data_offset(path: Path, m: NpzMember) -> int:
    """File offset of a stored member's array data (after the zip local header and the .npy header)."""
    with open(path, "rb") as f:
        f.seek(m.zinfo.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise DataError(f"{path}: array '{m.name}': bad zip entry; write the file again with np.savez")
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    return m.zinfo.header_offset + 30 + name_len + extra_len + m.header_bytes


def read_member(path: Path, zf: zipfile.ZipFile, m: NpzMember, where: str) -> np.ndarray:
    """A member's array: memory-mapped (read-only) when stored uncompressed, else read into memory."""
    if m.stored and m.nbytes > 0:
        offset = _data_offset(path, m)
        if offset + m.nbytes > path.stat().st_size:
            raise DataError(f"{where}: array '{m.name}' runs past the end of the file; write it again with "
                            f"np.savez")
        return np.memmap(path, dtype=m.dtype, mode="r", offset=offset, shape=m.shape,
                         order="F" if m.fortran_order else "C")
    try:
        with zf.open(m.zinfo) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{where}: the .npz is damaged ({e}); write it again with np.savez") from e


def open_npz(path: str | Path, inputs: Sequence[TensorInfo] = ()) -> tuple[zipfile.ZipFile, dict[str, NpzMember]]:
    """Open an .npz and read its headers (see :func:`inspect_npz`); DataError for a missing or non-.npz file."""
    path = Path(path)
    where = str(path)
    names = ", ".join(t.name for t in inputs) or "the model inputs"
    if not path.is_file():
        raise DataError(f"{where}: no such file; give an .npz with arrays named {names}")
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise DataError(f"{where}: a single .npy array, not an .npz archive; save with "
                                f"np.savez(path, {', '.join(f'{t.name}=...' for t in inputs) or 'name=array'})") from e
        raise DataError(f"{where}: cannot read it as an .npz ({e}); save inputs with np.savez") from e
    try:
        return zf, inspect_npz(zf, where)
    except BaseException:
        zf.close()
        raise


def _check_budget(where: str, held: dict[str, int], cap: int) -> None:
    total = sum(held.values())
    if total > cap:
        biggest = max(held, key=held.__getitem__)
        raise DataError(f"{where}: reading it needs {_size(total)} in memory (array '{biggest}': "
                        f"{_size(held[biggest])}), more than the {_size(cap)} limit; if the data is genuine, raise "
                        f"it with --max-input-bytes or {ENV_MAX_INPUT_BYTES}={total}, or save the arrays "
                        f"uncompressed (np.savez) so they are memory-mapped")


def load_npz(path: str | Path, inputs: Sequence[TensorInfo], max_bytes: int | None = None) -> Dataset:
    """Read an .npz whose arrays are named after the model ``inputs`` (plus optional ``labels``).

    Headers are checked first (names, dtypes, shapes, declared sizes against the zip entries); arrays
    stored uncompressed are memory-mapped, compressed ones and casts are held in memory and together
    capped at :func:`max_input_bytes` (``max_bytes`` overrides). Raises DataError naming the array."""
    path = Path(path)
    where = str(path)
    zf, members = open_npz(path, inputs)
    with zf:
        missing = [t.name for t in inputs if t.name not in members]
        if missing:
            raise DataError(f"{where}: no array named {', '.join(repr(m) for m in missing)} (a model input); "
                            f"the file has {', '.join(repr(k) for k in members) or 'no arrays'}")
        extra = [k for k in members if k != LABELS and k not in {t.name for t in inputs}]
        if extra:
            log.warning("%s: ignoring arrays that are not model inputs: %s", where, ", ".join(extra))
        held: dict[str, int] = {}
        for t in inputs:
            m = members[t.name]
            check_dtype_and_shape(t, m.dtype, m.shape, where, cast=True)
            cast_bytes = math.prod(m.shape) * np.dtype(t.dtype).itemsize if m.dtype != np.dtype(t.dtype) else 0
            held[t.name] = (0 if m.stored else m.nbytes) + cast_bytes
        if LABELS in members:
            held[LABELS] = 0 if members[LABELS].stored else members[LABELS].nbytes
        _check_budget(where, held, max_input_bytes(max_bytes))
        raw = {t.name: read_member(path, zf, members[t.name], where) for t in inputs}
        labels = np.asarray(read_member(path, zf, members[LABELS], where)) if LABELS in members else None
    arrays = {t.name: check_finite(t, check_array(t, raw[t.name], where, cast=True), where) for t in inputs}
    return Dataset(arrays, inputs, labels=labels, source=where)


# ------------------------------------------------------------------------------------------ streaming


class _RowReader:
    """Rows of one C-ordered .npy member with its batch axis first, read block by block from the zip entry
    (stored or deflated) without holding the array."""

    def __init__(self, zf: zipfile.ZipFile, m: NpzMember) -> None:
        self.m = m
        self.row_bytes = math.prod(m.shape[1:]) * m.dtype.itemsize
        self.f = zf.open(m.zinfo)
        self.f.read(m.header_bytes)

    def read(self, rows: int) -> np.ndarray:
        want = rows * self.row_bytes
        data = self.f.read(want)
        if len(data) != want:
            raise DataError(f"array '{self.m.name}' ends early (damaged file); write it again with np.savez")
        return np.frombuffer(data, dtype=self.m.dtype).reshape((rows, *self.m.shape[1:]))

    def close(self) -> None:
        self.f.close()


class NpzBatches:
    """An .npz read batch by batch, for runs whose memory must stay flat in the number of rows.

    Headers are checked when it is opened (names, dtypes, shapes, sample counts, declared sizes); each batch
    is then read, cast (overflow refused) and checked for NaN/Inf on its own. Inputs with their batch axis first
    in C order (what ``np.savez`` writes for ``[N, ...]`` arrays) are streamed from the zip entry, stored or
    compressed; other layouts are memory-mapped when stored, else read whole (counted against
    :func:`max_input_bytes`). Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path, inputs: Sequence[TensorInfo], max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self.inputs = list(inputs)
        self.zf, members = open_npz(self.path, inputs)
        try:
            missing = [t.name for t in inputs if t.name not in members]
            if missing:
                raise DataError(f"{self.where}: no array named {', '.join(repr(m) for m in missing)} (a model "
                                f"input); the file has {', '.join(repr(k) for k in members) or 'no arrays'}")
            self.members = {t.name: members[t.name] for t in inputs}
            held: dict[str, int] = {}
            for t in inputs:
                m = self.members[t.name]
                check_dtype_and_shape(t, m.dtype, m.shape, self.where, cast=True)
                if m.dtype != np.dtype(t.dtype):
                    log.warning("%s: casting array '%s' from %s to %s (batch by batch)", self.where, t.name, m.dtype,
                                np.dtype(t.dtype))
                held[t.name] = 0 if (self._streamed(t) or m.stored) else m.nbytes
            _check_budget(self.where, held, max_input_bytes(max_bytes))
            sizes = {t.name: self.members[t.name].shape[t.batch_axis] for t in inputs if t.batch_axis is not None}
            if len(set(sizes.values())) > 1:
                listed = ", ".join(f"'{n}': {s}" for n, s in sizes.items())
                raise DataError(f"{self.where}: arrays disagree on the number of samples ({listed}); give each the "
                                f"same count")
            self._n = int(next(iter(sizes.values()), 0))
            if self._n == 0:
                raise DataError(f"{self.where}: no samples (the batch axis of {', '.join(sizes) or 'the inputs'} "
                                f"is empty); give at least one sample")
            self._whole = {t.name: read_member(self.path, self.zf, self.members[t.name], self.where)
                           for t in inputs if not self._streamed(t)}
        except BaseException:
            self.zf.close()
            raise

    def _streamed(self, t: TensorInfo) -> bool:
        m = self.members[t.name]
        return t.batch_axis == 0 and not m.fortran_order and len(m.shape) >= 1

    def __len__(self) -> int:
        return self._n

    def __enter__(self) -> NpzBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.zf.close()

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Dicts of checked input arrays, ``batch_size`` samples each (the last one may be smaller)."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        readers = {t.name: _RowReader(self.zf, self.members[t.name]) for t in self.inputs if self._streamed(t)}
        try:
            for start in range(0, self._n, batch_size):
                stop = min(start + batch_size, self._n)
                feeds: dict[str, np.ndarray] = {}
                for t in self.inputs:
                    if t.name in readers:
                        try:
                            a = readers[t.name].read(stop - start)
                        except (OSError, zipfile.BadZipFile, EOFError) as e:
                            raise DataError(f"{self.where}: the .npz is damaged ({e}); write it again with "
                                            f"np.savez") from e
                    elif t.batch_axis is None:
                        a = self._whole[t.name]
                    else:
                        a = np.take(self._whole[t.name], np.arange(start, stop), axis=t.batch_axis)
                    where = f"{self.where} (samples {start}..{stop - 1})"
                    a = np.asarray(a)
                    if a.dtype != np.dtype(t.dtype):
                        a = cast_array(t, a, where)
                    feeds[t.name] = check_finite(t, a, where)
                yield feeds
        finally:
            for r in readers.values():
                r.close()


class NpzWriter:
    """Write an .npz array by array and row block by row block, holding no more than one block.

    Each array goes to a temporary ``.npy`` beside the destination (header for its final shape, then its
    rows appended); :meth:`commit` packs them into one zip (stored, ZIP64) and renames it into place, with
    the mode the umask gives new files. Arrays whose rows are not along axis 0 are kept in memory and
    written at the end. Raises DataError naming the path when it cannot be written."""

    def __init__(self, path: str | Path, n_rows: int) -> None:
        self.path = Path(path)
        self.n_rows = n_rows
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}-", dir=self.path.parent))
        except OSError as e:
            raise DataError(f"{self.path}: cannot write the output ({e.strerror or e}); choose another -o "
                            f"path") from e
        self._files: dict[str, tuple[Path, Any, tuple[int, ...], np.dtype, int]] = {}
        self._memory: dict[str, tuple[int, list[np.ndarray]]] = {}

    def append(self, name: str, block: np.ndarray, axis: int = 0) -> None:
        """Append ``block``'s rows (along ``axis``) to array ``name``."""
        block = np.asarray(block)
        if axis != 0:
            self._memory.setdefault(name, (axis, []))[1].append(block)
            return
        try:
            if name not in self._files:
                tmp = self.dir / f"{len(self._files)}.npy"
                f = open(tmp, "wb")
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(block.dtype), "fortran_order": False,
                        "shape": (self.n_rows, *block.shape[1:])})
                self._files[name] = (tmp, f, block.shape[1:], block.dtype, 0)
            tmp, f, rest, dtype, rows = self._files[name]
            if block.shape[1:] != rest or block.dtype != dtype:
                raise DataError(f"{self.path}: output '{name}' changes from {list(rest)} {dtype} to "
                                f"{list(block.shape[1:])} {block.dtype} between batches; run with one batch "
                                f"(--batch {self.n_rows})")
            f.write(np.ascontiguousarray(block).tobytes())
            self._files[name] = (tmp, f, rest, dtype, rows + block.shape[0])
        except OSError as e:
            self.abort()
            raise DataError(f"{self.path}: cannot write the output ({e.strerror or e}); choose another -o "
                            f"path") from e

    def commit(self) -> None:
        """Pack the arrays into ``path`` atomically (DataError when a row count is short)."""
        try:
            for name, (_tmp, f, _rest, _dtype, rows) in self._files.items():
                f.close()
                if rows != self.n_rows:
                    raise DataError(f"{self.path}: output '{name}' has {rows} rows, expected {self.n_rows}")
            packed = self.dir / "packed.npz"
            with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, (tmp, *_r) in self._files.items():
                    with open(tmp, "rb") as src, zf.open(f"{name}.npy", "w", force_zip64=True) as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    tmp.unlink()
                for name, (axis, blocks) in self._memory.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as dst:
                        np.lib.format.write_array(dst, np.concatenate(blocks, axis=axis), allow_pickle=False)
            with open(packed, "rb+") as f:
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(packed, 0o666 & ~umask)
            os.replace(packed, self.path)
        except OSError as e:
            raise DataError(f"{self.path}: cannot write the output ({e.strerror or e}); choose another -o "
                            f"path") from e
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary files (the destination is untouched)."""
        for _tmp, f, *_r in self._files.values():
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)
