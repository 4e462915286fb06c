"""The ORT CPU backend's reused gather buffers (``_RowBuffers``): same rows as np.take, never shared while in use."""

from __future__ import annotations

import threading

import numpy as np

from eecompile.runtimes.onnxruntime import POOL_MIN_BYTES, Blocked, OnnxRuntimeBackend, _RowBuffers


def _big(rows: int = 8) -> np.ndarray:
    per_row = POOL_MIN_BYTES // 4 + 16  # one row alone reaches the pooling size
    return np.arange(rows * per_row, dtype=np.float32).reshape(rows, per_row)


def test_pooled_rows_equal_take_and_buffers_are_reused_only_when_free() -> None:
    pool, x = _RowBuffers(), _big()
    a = pool.take(x, np.array([0, 2, 5]))
    np.testing.assert_array_equal(a, x[[0, 2, 5]])
    b = pool.take(x, np.array([1, 3]))  # a is alive: another buffer
    assert not np.shares_memory(a, b)
    view = a[1:]
    del a
    c = pool.take(x, np.array([4, 6]))  # a's buffer is still referenced through view
    assert not np.shares_memory(c, view) and not np.shares_memory(c, b)
    np.testing.assert_array_equal(view, x[[2, 5]])
    del view, c
    d = pool.take(x, np.array([1, 4, 6, 7]))  # free again (and grown where too small)
    np.testing.assert_array_equal(d, x[[1, 4, 6, 7]])
    np.testing.assert_array_equal(b, x[[1, 3]])


def test_contiguous_rows_are_a_view_and_unsorted_rows_are_copied() -> None:
    pool, x = _RowBuffers(), _big()
    v = pool.take(x, np.arange(2, 6))
    assert np.shares_memory(v, x) and v.flags.c_contiguous
    np.testing.assert_array_equal(v, x[2:6])
    u = pool.take(x, np.array([0, 2, 1, 3]))  # spans 4 rows, but not in order
    assert not np.shares_memory(u, x)
    np.testing.assert_array_equal(u, x[[0, 2, 1, 3]])


def test_pool_is_bounded_and_thread_safe() -> None:
    pool, x = _RowBuffers(per_shape=2), _big()
    held = [pool.take(x, np.array([0, 3])) for _ in range(4)]  # beyond per_shape: fresh arrays
    assert all(not np.shares_memory(a, b) for i, a in enumerate(held) for b in held[i + 1:])
    out: list[np.ndarray] = []
    lock = threading.Lock()

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(50):
            rows = np.sort(rng.choice(8, size=3, replace=False))
            got = pool.take(x, rows)
            np.testing.assert_array_equal(got, x[rows])
            with lock:
                out.append(got)
                if len(out) > 3:
                    out.pop(0)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_backend_gather_pools_large_and_blocked_tensors() -> None:
    backend = OnnxRuntimeBackend.__new__(OnnxRuntimeBackend)  # gather needs no sessions
    backend._rows = _RowBuffers()
    x = _big()
    rows = np.array([1, 4, 7])
    g = backend.gather(x, rows, 0)
    np.testing.assert_array_equal(g, x[rows])
    assert any(g.base is b for bufs in backend._rows._bufs.values() for b in bufs)  # pooled
    small = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(backend.gather(small, np.array([2, 0]), 1), small[:, [2, 0]])
    blk = Blocked(x.reshape(8, -1, 1, 1), 16, x.shape[1])
    gb = backend.gather(blk, rows, 0)
    assert isinstance(gb, Blocked) and gb.block == 16 and gb.channels == x.shape[1]
    np.testing.assert_array_equal(gb.array, blk.array[rows])
