"""Data collection: every exit's gate score and correctness per calibration sample (:class:`ExitTable`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eecompile.bundle import Bundle, Manifest
from eecompile.calibrate.latency import session_options
from eecompile.errors import BundleError, CalibrationError, DataError
from eecompile.spec import GateKind

if TYPE_CHECKING:
    import onnx


@dataclass
class ExitTable:
    """What the chain with policy ``never`` says about each calibration sample.

    ``scores[e, n]``: gate value of early exit ``e`` (E early exits); ``correct[k, n]``: exit ``k``'s answer
    matches the reference (K = E + 1 exits, the final exit last); ``fires_above[e]``: the gate fires on
    large values; ``has_labels``: the reference is the labels (else the final exit's answer).
    """

    scores: np.ndarray
    correct: np.ndarray
    fires_above: list[bool]
    has_labels: bool = False

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
        return int(self.scores.shape[1])

    @property
    def n_early(self) -> int:
        return int(self.scores.shape[0])

    def subset(self, rows: np.ndarray) -> ExitTable:
        return ExitTable(self.scores[:, rows], self.correct[:, rows], list(self.fires_above), self.has_labels)


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
    :mod:`eecompile.runtimes.data`)."""
    from eecompile.runtimes.data import load_npz

    ds = load_npz(path, manifest.inputs)
    return ds.arrays, ds.labels


def _add_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Expose internal tensors as graph outputs (a copy; types from shape inference where known)."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    todo = [n for n in names if n not in have]
    if not todo:
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        infos = {v.name: v for v in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - shape inference is a nicety here; ORT infers the type anyway
        infos = {}
    produced = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.initializer}
    for n in todo:
        if n not in produced:
            raise BundleError(f"tensor '{n}' is not computed in this segment; recompile the bundle")
        model.graph.output.append(infos[n] if n in infos else helper.make_empty_tensor_value_info(n))
    return model


class ChainProbe:
    """Runs a bundle's segments one after another in ONNX Runtime on every row (policy ``never``).

    ``extra[k]`` names internal tensors of segment k to return as well (the features heads train on).
    Each row's outputs come from every exit: nothing is dropped, so calibration and training see all exits.
    """

    def __init__(self, bundle: Bundle, extra: Mapping[int, Sequence[str]] | None = None,
                 threads: int | None = None) -> None:
        import onnx
        import onnxruntime as ort

        self.bundle = bundle
        self.manifest = bundle.manifest
        self.sessions: list[ort.InferenceSession] = []
        self.models: list[onnx.ModelProto] = []
        so = session_options(threads)
        for seg in self.manifest.segments:
            path = bundle.verify_file(seg.file)
            model = onnx.load(str(path))
            names = list((extra or {}).get(seg.index, []))
            if names:
                model = _add_outputs(model, names)
            self.models.append(model)
            try:
                self.sessions.append(ort.InferenceSession(model.SerializeToString(), so,
                                                          providers=["CPUExecutionProvider"]))
            except Exception as e:  # noqa: BLE001 - ORT raises its own types; name the file instead
                raise BundleError(f"{path}: ONNX Runtime cannot load this segment ({e}); recompile the bundle") from e

    def segment_feeds(self, k: int, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = self.manifest.segments[k]
        feeds: dict[str, np.ndarray] = {}
        gate = seg.exit.gate
        for i in self.sessions[k].get_inputs():
            if gate is not None and i.name == gate.threshold_input:
                feeds[i.name] = np.asarray(gate.threshold, np.float32)
            elif i.name in env:
                feeds[i.name] = env[i.name]
            else:
                raise BundleError(f"{seg.file}: input '{i.name}' is produced by no earlier segment; recompile the bundle")
        return feeds

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Every segment's outputs (by name) for one batch of model inputs."""
        env: dict[str, np.ndarray] = dict(inputs)
        outs: list[dict[str, np.ndarray]] = []
        for k, sess in enumerate(self.sessions):
            names = [o.name for o in sess.get_outputs()]
            values = sess.run(names, self.segment_feeds(k, env))
            out = dict(zip(names, values, strict=True))
            outs.append(out)
            env.update(out)
        return outs


def iter_batches(n: int, batch_size: int, label: str, quiet: bool = False) -> Any:
    """Row slices of ``batch_size`` with a progress bar on the terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    starts = range(0, n, batch_size)
    if quiet:
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
    return np.argmax(logits, axis=class_axis if class_axis >= 0 else logits.ndim + class_axis)


def collect_exit_table(bundle: Bundle, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None, *,
                       batch_size: int = 256, quiet: bool = False) -> ExitTable:
    """Gate scores and per-exit correctness for every sample (chain with policy ``never``)."""
    m = bundle.manifest
    for seg in m.segments[:-1]:
        g = seg.exit.gate
        if g is None or not g.score_output:
            raise BundleError(
                f"{bundle.path}: exit {seg.exit.index} has no gate score output (exit.gate.score_output); "
                f"recompile the bundle with this eecompile version"
            )
    if m.batch_mode == "per_sample":
        batch_size = 1
    probe = ChainProbe(bundle)
    out_name = final_output(m)
    n = next(iter(inputs.values())).shape[0]
    e = len(m.segments) - 1
    scores = np.empty((e, n), np.float64)
    preds: np.ndarray | None = None
    for rows in iter_batches(n, batch_size, "running every exit", quiet):
        outs = probe.run({k: v[rows] for k, v in inputs.items()})
        for k, seg in enumerate(m.segments):
            p = predictions(outs[k][seg.exit.outputs[out_name]], m.class_axis)
            if preds is None:
                preds = np.empty((e + 1, n, *p.shape[1:]), p.dtype)
            preds[k, rows] = p
            if seg.exit.gate is not None and seg.exit.gate.score_output:
                scores[k, rows] = np.asarray(outs[k][seg.exit.gate.score_output], np.float64).reshape(-1)
    assert preds is not None
    correct = correctness(preds, labels)
    fires = [GateKind(s.exit.gate.kind).fires_above for s in m.segments[:-1] if s.exit.gate is not None]
    return ExitTable(scores, correct, fires, has_labels=labels is not None)
