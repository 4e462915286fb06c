"""Data collection: every exit's gate score and correctness per calibration sample (:class:`ExitTable`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eecompile.bundle import Bundle, Manifest
from eecompile.errors import BundleError, CalibrationError, DataError
from eecompile.spec import GateKind

if TYPE_CHECKING:
    from eecompile.runtimes.chain import EarlyExitRunner


@dataclass
class ExitTable:
    """What the chain with policy ``never`` says about each calibration sample.

    ``scores[e, n]``: gate value of early exit ``e`` (E early exits); ``correct[k, n]``: exit ``k``'s answer
    matches the reference (K = E + 1 exits, the final exit last); ``fires_above[e]``: the gate fires on
    large values; ``has_labels``: the reference is the labels (else the final exit's answer); ``shared``:
    every exit takes one threshold (PALBERT's Q-exit: one q for the cumulative halting probability), so the
    searches move all thresholds together.
    """

    scores: np.ndarray
    correct: np.ndarray
    fires_above: list[bool]
    has_labels: bool = False
    shared: bool = False

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.correct = np.asarray(self.correct, dtype=bool)
        if self.scores.ndim != 2 or self.correct.ndim != 2:
            raise CalibrationError("scores must be [early exits, samples] and correct [exits, samples]")
        e, n = self.scores.shape
        if self.correct.shape != (e + 1, n):
            raise CalibrationError(
                f"correct has shape {list(self.correct.shape)}; with {e} early exits and {n} samples it must be "
                f"[{e + 1}, {n}] (one row per exit, the final exit last)"
            )
        if len(self.fires_above) != e:
            raise CalibrationError(f"fires_above has {len(self.fires_above)} entries for {e} early exits")

    @property
    def n_samples(self) -> int:
        """N, the number of calibration samples."""
        return int(self.scores.shape[1])

    @property
    def n_early(self) -> int:
        """E, the number of early exits (the final exit not counted)."""
        return int(self.scores.shape[0])

    @property
    def n_exits(self) -> int:
        """Exits a sample can end at (rows of ``correct``): E + 1 on a chain."""
        return self.n_early + 1

    def exits_for(self, masks: Sequence[np.ndarray]) -> np.ndarray:
        """The exit each sample ends at (int64 [N], a row of ``correct``), given where each gate fires (``masks[e]``:
        bool, shaped like ``scores[e]``): on a chain, the first early exit whose gate fires, else the final exit.
        A table of another shape of network (jump exits: :class:`~eecompile.calibrate.jumps.JumpTable`) says
        otherwise; the searches only go through this."""
        return np.argmax(np.vstack([*masks, np.ones(self.n_samples, bool)]), axis=0)

    def subset(self, rows: np.ndarray) -> ExitTable:
        """The table restricted to sample ``rows`` (an index or boolean array over N)."""
        return ExitTable(self.scores[:, rows], self.correct[:, rows], list(self.fires_above), self.has_labels,
                         self.shared)


def correctness(preds: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """``correct[k, n]`` from predictions ``preds[k, n, ...]`` (argmax per exit, final exit last).

    The reference is the labels (``[n, ...]``) or, when None, the final exit's predictions. Samples with several
    predictions (tokens) count as correct only when all of them match.
    """
    preds = np.asarray(preds)
    ref = preds[-1] if reference is None else np.asarray(reference)
    if ref.shape != preds.shape[1:]:
        raise DataError(
            f"labels have shape {list(ref.shape)} but the model predicts {list(preds.shape[1:])} per batch; "
            f"give one label per sample (class indices)"
        )
    eq = preds == ref[None]
    return eq.reshape(eq.shape[0], eq.shape[1], -1).all(axis=2)


def load_data(path: str | Path, manifest: Manifest) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The model inputs (by name) and the optional ``labels`` of an .npz (checked by
    :mod:`eecompile.runtimes.data`). Raises DataError for a missing, malformed or mismatched file."""
    from eecompile.runtimes.data import load_npz

    ds = load_npz(path, manifest.inputs)
    return ds.arrays, ds.labels


def iter_batches(n: int, batch_size: int, label: str, quiet: bool = False) -> Iterator[slice]:
    """Row slices ``[s, s + batch_size)`` covering ``range(n)``, with a progress bar on the terminal when
    ``rich`` is installed and ``quiet`` is False (without rich: no bar, same slices)."""
    starts = range(0, n, batch_size)
    try:
        if quiet:
            raise ImportError
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:
        yield from (slice(s, min(s + batch_size, n)) for s in starts)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=n)
        for s in starts:
            yield slice(s, min(s + batch_size, n))
            bar.advance(task, min(batch_size, n - s))


def final_output(manifest: Manifest) -> str:
    """The final output calibration and training compare against (the first of the model's outputs)."""
    return manifest.outputs[0].name


def predictions(logits: np.ndarray, class_axis: int) -> np.ndarray:
    """Class indices: argmax of ``logits`` along ``class_axis`` (negative counts from the end)."""
    return np.argmax(logits, axis=class_axis if class_axis >= 0 else logits.ndim + class_axis)


def collect_exit_table(bundle: Bundle, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None, *,
                       batch_size: int = 256, quiet: bool = False,
                       runner: EarlyExitRunner | None = None, error_budget: float | None = None) -> ExitTable:
    """Gate scores and per-exit correctness for every sample, from the runner with policy ``never``.

    ``inputs``: the model inputs by name, ``N`` samples along each input's batch axis; ``labels``: ``[N, ...]``
    class indices, or None to compare every exit with the final exit. ``runner``: the
    :class:`~eecompile.runtimes.chain.EarlyExitRunner` to use (its backend decides where the scores are
    computed); by default one on ONNX Runtime, closed at the end. Returns an :class:`ExitTable` with
    float64 ``scores [E, N]`` and bool ``correct [E + 1, N]``, ``shared`` when every gate is a Q-exit. Raises BundleError when an exit has no gate
    score output, DataError when the labels do not match the predictions.

    ``error_budget`` (regression outputs, no class axis): an exit is "correct" for a sample when its output's
    relative L2 error to the final output, ``||y_k - y|| / max(||y||, 1e-12)`` over the sample's values, is at
    most ``error_budget``; labels are not used. The losses stay 0/1, so the search and Learn-then-Test
    bounds apply unchanged (they bound the fraction of samples over the budget).
    """
    m = bundle.manifest
    for seg in m.segments[:-1]:
        g = seg.exit.gate
        if g is None or not g.score_output:
            raise BundleError(
                f"{bundle.path}: exit {seg.exit.index} has no gate score output (exit.gate.score_output); "
                f"recompile the bundle with this eecompile version"
            )
    own = runner is None
    if runner is None:
        from eecompile.runtimes.chain import EarlyExitRunner

        runner = EarlyExitRunner(bundle)
    out_name = final_output(m)
    out_axis = m.outputs[0].batch_axis or 0  # time-major outputs ([T, B, C]) have the batch on axis 1
    axes = {t.name: t.batch_axis for t in m.inputs}
    n = next(int(v.shape[axes[k] or 0]) for k, v in inputs.items() if axes.get(k) is not None)
    e = len(m.segments) - 1
    scores = np.empty((e, n), np.float64)
    preds: np.ndarray | None = None
    try:
        for rows in iter_batches(n, batch_size, "running every exit", quiet):
            feeds = {k: _rows(v, rows, axes.get(k)) for k, v in inputs.items()}
            res = runner.run(feeds, thresholds="never", policy="never")
            assert res.all_exits is not None and res.gate_scores is not None
            if error_budget is not None:
                within = within_error_budget([o[out_name] for o in res.all_exits], out_axis, error_budget)
                if preds is None:
                    preds = np.empty((e + 1, n), bool)
                preds[:, rows] = np.stack(within)
                scores[:, rows] = res.gate_scores
                continue
            for k, outs in enumerate(res.all_exits):
                p = _batch_first(predictions(outs[out_name], m.class_axis), out_axis, m.class_axis,
                                 outs[out_name].ndim)
                if preds is None:
                    preds = np.empty((e + 1, n, *p.shape[1:]), p.dtype)
                preds[k, rows] = p
            scores[:, rows] = res.gate_scores
    finally:
        if own:
            runner.close()
    assert preds is not None
    correct = preds if error_budget is not None else correctness(preds, labels)
    kinds = [GateKind(s.exit.gate.kind) for s in m.segments[:-1] if s.exit.gate is not None]
    shared = len(kinds) > 1 and all(k == GateKind.Q_EXIT for k in kinds)  # one q for every Q-exit (PALBERT)
    return ExitTable(scores, correct, [k.fires_above for k in kinds], has_labels=labels is not None, shared=shared)


def within_error_budget(ys: Sequence[np.ndarray], batch_axis: int, error_budget: float) -> list[np.ndarray]:
    """Per output in ``ys`` (one per exit, the reference last; batch on ``batch_axis``): bool [B], its relative L2
    error to the reference, ``||y_k - y|| / max(||y||, 1e-12)`` over each sample's values, is <= ``error_budget``."""
    flat = [np.moveaxis(np.asarray(y, np.float64), batch_axis, 0) for y in ys]
    flat = [y.reshape(y.shape[0], -1) for y in flat]
    ref_norm = np.maximum(np.linalg.norm(flat[-1], axis=1), 1e-12)
    return [np.linalg.norm(y - flat[-1], axis=1) / ref_norm <= error_budget for y in flat]


def _batch_first(pred: np.ndarray, batch_axis: int, class_axis: int, ndim: int) -> np.ndarray:
    """Predictions (the class axis reduced away) with the batch moved to axis 0."""
    c = class_axis % ndim
    b = batch_axis if batch_axis < c else batch_axis - 1
    return np.moveaxis(pred, b, 0) if b else pred


def _rows(a: np.ndarray, rows: slice, axis: int | None) -> np.ndarray:
    if axis is None:
        return a
    index: list[slice] = [slice(None)] * a.ndim
    index[axis] = rows
    return a[tuple(index)]
