"""Input .npz files are checked against their headers before any data is read: a declared size the entry
does not hold, or more than the memory cap, is one DataError naming the array and the fix."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from eecompile.bundle import TensorInfo
from eecompile.errors import DataError
from eecompile.runtimes import data as npzdata
from eecompile.runtimes.data import ENV_MAX_INPUT_BYTES, load_npz
from tests.bad_inputs.util import D, expect_error, invoke

X = [TensorInfo("x", "float32", ["N", D], 0)]


def _run(ws: Path, data: Path) -> list:
    return ["run", ws / "b.eebundle", "--data", data, "-o", ws / "out.npz"]


def _header_only(path: Path, shape: tuple[int, ...], dtype: str = "<f4") -> Path:
    """An .npz whose one member is an .npy header declaring ``shape`` and no data at all."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("x.npy", buf.getvalue())
    return path


def test_tiny_file_claiming_a_huge_array(ws: Path) -> None:
    """207 bytes declaring 10**12 x 16 float32 (64 TB): refused from the header, not a MemoryError."""
    bad = _header_only(ws / "claims.npz", (10**12, 16))
    assert bad.stat().st_size < 300
    err = expect_error(_run(ws, bad), DataError, "claims.npz", "'x'", "1000000000000, 16", "damaged or forged",
                       "np.savez", workspace=ws)
    assert "58.2 TB" in err.message


def test_compressed_bomb_over_the_cap_is_refused_before_decompressing(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = ws / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros((1 << 20, D), np.float32))  # 32 MB of zeros in a few kB
    assert bomb.stat().st_size < 200_000
    monkeypatch.setenv(ENV_MAX_INPUT_BYTES, str(16 << 20))

    def no_reading(*a: object, **k: object) -> None:
        raise AssertionError("array data read before the size was checked")

    monkeypatch.setattr(npzdata.np.lib.format, "read_array", no_reading)
    # bench and calibrate hold their data in memory: the cap applies.
    expect_error(["bench", ws / "b.eebundle", "--data", bomb], DataError, "bomb.npz", "'x'", "32.0 MB", "limit",
                 ENV_MAX_INPUT_BYTES, workspace=ws)
    monkeypatch.undo()
    assert len(load_npz(bomb, X, max_bytes=64 << 20)) == 1 << 20  # a raised cap reads it
    # run streams it batch by batch (never the whole array at once), so the same file runs under the cap.
    monkeypatch.setenv(ENV_MAX_INPUT_BYTES, str(16 << 20))
    res = invoke(["run", ws / "b.eebundle", "--data", bomb, "-o", ws / "out.npz", "--batch", "4096"])
    assert res.exit_code == 0, res.output


def test_truncated_member_is_refused(ws: Path) -> None:
    good = ws / "good.npz"
    np.savez(good, x=np.ones((64, D), np.float32))
    raw = bytearray(good.read_bytes())
    member = zipfile.ZipFile(good).getinfo("x.npy")
    with zipfile.ZipFile(ws / "short.npz", "w", zipfile.ZIP_STORED) as zf:
        with zipfile.ZipFile(io.BytesIO(bytes(raw))) as src:
            zf.writestr("x.npy", src.read(member)[:-100])
    expect_error(_run(ws, ws / "short.npz"), DataError, "short.npz", "'x'", "declares shape [64, 8]",
                 workspace=ws)


def test_uncompressed_members_are_memory_mapped(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    x = np.random.default_rng(0).standard_normal((100, D)).astype(np.float32)
    np.savez(p, x=x, labels=np.arange(100))
    ds = load_npz(p, X)
    a = ds.arrays["x"]
    assert isinstance(a, np.memmap) or isinstance(a.base, np.memmap)
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(ds.labels, np.arange(100))
    np.savez_compressed(p, x=x)
    assert not isinstance(load_npz(p, X).arrays["x"], np.memmap)
    np.testing.assert_array_equal(load_npz(p, X).arrays["x"], x)


def test_object_arrays_are_refused(ws: Path) -> None:
    p = ws / "objects.npz"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (2, D)})
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\0" * 64)
    expect_error(_run(ws, p), DataError, "objects.npz", "'x'", "Python objects", workspace=ws)


def test_overflowing_cast_names_the_input(ws: Path) -> None:
    x = np.zeros((16, D))
    x[3, 2] = 1e300
    np.savez(ws / "big.npz", x=x)
    expect_error(_run(ws, ws / "big.npz"), DataError, "overflow while casting float64 to float32", "'x'",
                 "sample 3", "1e+300", workspace=ws)
    with pytest.raises(DataError, match="overflow while casting"):
        load_npz(ws / "big.npz", X)


@pytest.mark.parametrize("compressed", [False, True])
def test_batches_stream_the_same_rows(tmp_path: Path, compressed: bool) -> None:
    from eecompile.runtimes.data import NpzBatches

    x = np.random.default_rng(1).standard_normal((103, D))  # float64: cast per batch
    p = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(p, x=x)
    with NpzBatches(p, X) as ds:
        assert len(ds) == 103
        blocks = [b["x"] for b in ds.batches(10)]
    assert [len(b) for b in blocks] == [10] * 10 + [3]
    assert all(b.dtype == np.float32 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), x.astype(np.float32))


def test_batches_name_the_sample_of_a_nan(tmp_path: Path) -> None:
    from eecompile.runtimes.data import NpzBatches

    x = np.zeros((50, D), np.float32)
    x[37, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=x)
    with NpzBatches(tmp_path / "d.npz", X) as ds, pytest.raises(DataError, match=r"samples 30\.\.39.*NaN/Inf"):
        list(ds.batches(10))


def test_writer_round_trip_mode_and_abort(tmp_path: Path) -> None:
    import os
    import stat

    from eecompile.runtimes.data import NpzWriter

    y = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    tm = np.arange(5 * 40 * 2, dtype=np.int64).reshape(5, 40, 2)  # rows along axis 1 (time-major)
    old = os.umask(0o027)
    try:
        w = NpzWriter(tmp_path / "out.npz", 40)
        for s in range(0, 40, 16):
            w.append("y", y[s:s + 16])
            w.append("tm", tm[:, s:s + 16], axis=1)
        w.commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.npz").stat().st_mode) == 0o640
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_array_equal(z["y"], y)
        np.testing.assert_array_equal(z["tm"], tm)
    w = NpzWriter(tmp_path / "half.npz", 40)
    w.append("y", y[:16])
    with pytest.raises(DataError, match="'y' has 16 rows, expected 40"):
        w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]  # nothing half-written left behind
