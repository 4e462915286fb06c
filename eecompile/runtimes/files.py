"""Running a bundle on an ``.npz`` and writing the result atomically: the part of ``eecompile run`` a device needs.

:func:`run_npz` is shared by the CLI (:func:`eecompile.io.run_file`, which adds a progress bar) and the device
entry point (``eecompile-device run``). numpy and the runtime only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle
from eecompile.errors import DataError
from eecompile.runtimes.base import resolve_thresholds
from eecompile.runtimes.chain import EarlyExitRunner
from eecompile.runtimes.data import NpzBatches, NpzWriter

Progress = Callable[[int], AbstractContextManager[Callable[[], None]]]


def run_npz(bundle: str | Path, data: str | Path, output: str | Path, policy: str = "compact",
            thresholds: str | None = None, batch_size: int = 32, backend: str = "onnxruntime",
            threads: int | None = None, progress: Progress | None = None, max_input_bytes: int | None = None,
            steps: int | None = None, loop_threshold: str | None = None, **backend_options: Any) -> str:
    """Run a bundle on an .npz and write OUT.npz (each final output + ``exit_index`` int64 [N]; with jump exits
    ``jumped`` int64 [N] (the jump exit each sample took, -1 for none); for each end-only
    output ``present.{name}`` bool [N], False where the sample left early and its rows are NaN or 0; with policy
    ``never`` also ``exit{k}.{name}`` for every output an exit gives and ``gate_masks`` bool [K-1, N]). Returns a
    one-line summary.

    Streams: each batch is read from the input file, run and appended to the output before the next is read,
    so memory stays flat in the number of rows (:class:`~eecompile.runtimes.data.NpzBatches`,
    :class:`~eecompile.runtimes.data.NpzWriter`); the output appears atomically, with the mode the umask gives.
    ``thresholds``: a comma-separated list (``0.9,never``), checked by
    :func:`~eecompile.runtimes.base.resolve_thresholds`. ``batch_size``: samples per runner call. ``progress``:
    called with the number of batches, returns a context manager yielding a per-batch callback.
    ``max_input_bytes``: cap on input bytes held in memory at once (arrays that cannot be streamed; default
    ``EECOMPILE_MAX_INPUT_BYTES`` or 8 GiB). A loop bundle (``manifest.loop``) runs through
    :func:`eecompile.runtimes.loop.run_loop_npz` (``steps``, ``loop_threshold``; its results and ``steps``). Raises :class:`DataError` for unreadable data or an unwritable
    output (checked before anything runs), and whatever :meth:`EarlyExitRunner.run` raises."""
    if batch_size < 1:
        raise DataError(f"--batch must be >= 1, got {batch_size}")
    output = Path(output)
    if not output.parent.is_dir():
        raise DataError(f"{output.parent}: directory does not exist; create it or choose another -o path")
    if output.is_dir():
        raise DataError(f"{output}: is a directory; give a file name for the output .npz")
    if output.exists() and Path(data).exists() and os.path.samefile(output, data):
        raise DataError(f"{output}: is the --data file; writing the outputs there would replace the inputs; choose "
                        f"another -o path")
    if not os.access(output.parent, os.W_OK):  # say so before running every batch, not after
        raise DataError(f"{output}: cannot write there ({output.parent} is not writable); choose another -o path")
    options: dict[str, Any] = dict(backend_options) if threads is None else {**backend_options, "threads": threads}
    loaded = Bundle.load(bundle) if not isinstance(bundle, Bundle) else bundle
    if loaded.manifest.loop is not None:
        from eecompile.runtimes.loop import run_loop_npz

        return run_loop_npz(loaded, data, output, policy=policy, thresholds=thresholds, batch_size=batch_size,
                            backend=backend, progress=progress, max_input_bytes=max_input_bytes, steps=steps,
                            loop_threshold=loop_threshold, **options)
    if steps is not None or loop_threshold is not None:
        raise DataError(f"{loaded.path}: --steps and --loop-threshold are for loop bundles (compiled from a spec "
                        f"with 'loop:'); this bundle runs its chain once")
    if loaded.manifest.jumps:  # jump exits: the same results through the runner that merges jumped rows
        from eecompile.runtimes.jumps import JumpRunner

        runner_cm: Any = JumpRunner(loaded, backend=backend, **options)
    else:
        runner_cm = EarlyExitRunner(loaded, backend=backend, **options)
    with runner_cm as runner:
        thr = runner.resolve(None) if thresholds is None else resolve_thresholds(
            runner.manifest.exits, parse_threshold_list(thresholds), where="--thresholds")
        out_axes = {t.name: (t.batch_axis or 0) for t in runner.manifest.outputs}
        n_exits = runner.n_exits
        with NpzBatches(data, runner.inputs, max_bytes=max_input_bytes) as dataset:
            n = len(dataset)
            counts = np.zeros(n_exits, np.int64)
            jump_exits = {int(j["exit"]) for j in runner.manifest.jumps or ()}
            jumped = np.zeros(n_exits, np.int64)
            writer = NpzWriter(output, n)
            try:
                with (progress(-(-n // batch_size)) if progress is not None else nullcontext(_nothing)) as advance:
                    for feeds in dataset.batches(batch_size):
                        r = runner.run(feeds, thresholds=thr, policy=policy)
                        counts += r.exit_counts
                        for name, a in r.outputs.items():
                            writer.append(name, a, out_axes[name])
                        writer.append("exit_index", r.exit_index)
                        if jump_exits:  # the jump exit each sample took (segment index), -1 for none
                            jumped += np.bincount(r.jumped[r.jumped >= 0], minlength=n_exits)
                            writer.append("jumped", r.jumped)
                        for name, mask in r.present.items():  # end-only outputs: which rows have a value
                            writer.append(f"present.{name}", mask)
                        if r.all_exits is not None and r.gate_masks is not None:
                            for k, exits in enumerate(r.all_exits):
                                for name, a in exits.items():
                                    writer.append(f"exit{k}.{name}", a, out_axes[name])
                            writer.append("gate_masks", r.gate_masks, axis=1)
                        advance()
                writer.commit()
            except BaseException:
                writer.abort()
                raise
    from eecompile.runtimes.jumps import exit_shares

    return f"{n} samples -> {output}: {exit_shares(runner.manifest, counts, jumped, n)}"


def _nothing() -> None:
    return None


def parse_threshold_list(text: str) -> list[str] | str:
    """``"0.9, never,always"`` -> ``["0.9", "never", "always"]`` (checked later, per gate kind); one value without a
    comma (``"never"``, ``"0.9"``) is returned as it is, for every exit, as the runner takes it (and as the
    wrong-count message says)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 and "," not in text else parts


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an .npz to a temporary file beside ``path``, then rename it into place (no half-written
    output). Raises :class:`DataError` naming ``path`` when it cannot be written."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DataError(f"{path}: cannot write the output ({e.strerror or e}); choose another -o path") from e
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; an output file is like any other
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write the output ({e.strerror or e}); choose another -o path") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["parse_threshold_list", "run_npz", "save_npz_atomic"]
