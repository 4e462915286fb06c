"""CLI-side file I/O: ``eecompile run`` on an ``.npz`` with a progress bar (rich) on the terminal.

The work itself (batches through the runner, the atomically written result) is
:func:`eecompile.runtimes.files.run_npz`, which a device runs without rich (``eecompile-device run``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from eecompile.runtimes.files import parse_threshold_list, run_npz, save_npz_atomic

__all__ = ["parse_threshold_list", "run_file", "save_npz_atomic"]


def run_file(bundle: str | Path, data: str | Path, output: str | Path, policy: str = "compact",
             thresholds: str | None = None, batch_size: int = 32, backend: str = "onnxruntime",
             threads: int | None = None, max_input_bytes: int | None = None, **backend_options: Any) -> str:
    """:func:`~eecompile.runtimes.files.run_npz` (streaming, batch by batch) with a progress bar on stderr when
    there are many batches and a terminal to draw on. Returns the one-line summary."""
    return run_npz(bundle, data, output, policy=policy, thresholds=thresholds, batch_size=batch_size,
                   backend=backend, threads=threads, progress=_progress, max_input_bytes=max_input_bytes,
                   **backend_options)


class _progress:
    """A rich progress bar on stderr when there are many batches and a terminal to draw on."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: Any = None

    def __enter__(self) -> Callable[[], None]:
        from rich.console import Console

        console = Console(stderr=True)
        if self.total < 8 or not console.is_terminal:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(console=console, transient=True)
        self._bar.start()
        task = self._bar.add_task("running", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
