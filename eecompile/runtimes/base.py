"""The runtime's contract, in one place: policies, thresholds, feed checks, and the segment-backend protocol.

Every backend (ONNX Runtime, TensorRT) and every caller (the runner, calibration, verify, parity checks,
benchmarks) goes through these, so a bad threshold or a bad feed raises the same error everywhere:

- :data:`POLICIES`: how the chain treats samples that exit (``compact``, ``wait-all``, ``never``);
- :func:`resolve_thresholds`: the one parser of run-time thresholds (number / ``"never"`` / ``"always"``,
  scalar or one per early exit), range-checked per gate kind, raising :class:`~eecompile.errors.ThresholdError`;
- :func:`check_feeds`: model inputs by name, dtype and shape, and the batch size they agree on;
- :class:`SegmentBackend`: what a backend implements so that the one segment loop (``chain.py``) can drive it.

A backend owns one executable per segment (an ONNX Runtime session, a TensorRT engine + context) and the memory
its tensors live in. Tensors handed between its methods are backend-native ("device arrays": numpy on ORT CPU,
OrtValues or device buffers elsewhere), so activations never leave the device except for the rows that exit.
Like Polygraphy's runners: the state checks live here, the backend specifics in small methods.

Imports: numpy, the bundle module and the errors only (no onnx, no torch): this runs on a Jetson.
"""

from __future__ import annotations

import functools
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, ExitInfo, GateInfo, TensorInfo
from eecompile.errors import BackendError, BundleError, DataError, SpecError, ThresholdError
from eecompile.runtimes.data import batch_size_of, check_array

BACKENDS = ("onnxruntime", "tensorrt")
"""The backends a bundle runs on (``eecompile build --backend`` and ``EarlyExitRunner(backend=...)``)."""

POLICIES = ("compact", "wait-all", "never")
"""``compact``: exited rows are dropped from later segments; ``wait-all``: every row runs until all have exited
(the batch never shrinks); ``never``: every row runs every segment and every exit's outputs are returned
(calibration, training); each row's result still comes from the first exit whose gate fires."""

OVERRIDES = ("never", "always")
"""Threshold overrides: the gate still runs in the graph, but its decision is replaced."""

Threshold = float | str  # a number, "never" or "always"

# Inclusive range of the threshold each gate kind accepts (the value compared with the gate's score), for the
# exit gates (names.GATE_KINDS) and the loop gates (names.LOOP_GATE_KINDS; `change` and `score` mean the same in
# both): probabilities and normalised entropy lie in [0, 1]; patience counts consecutive agreeing exits (a positive
# integer); a relative change and a top-2 logit gap are >= 0; score (a head's raw score) and saturation (a cosine,
# which float rounding can put a hair above 1 in a calibrated threshold) only need to be numbers. The spec checks
# its thresholds with the same function (threshold_problem), so the two cannot disagree.
THRESHOLD_RANGES: dict[str, tuple[float, float]] = {
    "max_prob": (0.0, 1.0),
    "entropy": (0.0, 1.0),
    "margin": (0.0, 1.0),
    "patience": (1.0, math.inf),
    "saturation": (-math.inf, math.inf),
    "score": (-math.inf, math.inf),
    "change": (0.0, math.inf),  # relative L2 change of the output from the previous exit's (or step's); +inf fires
    "q_exit": (0.0, 1.0),  # probability of having halted (PALBERT)
    "logit_gap": (0.0, math.inf),  # loop gate: mean (or min) top-1 minus top-2 logit over masked positions (Prophet)
}
INTEGER_THRESHOLDS = frozenset({"patience"})
FIRES_BELOW = frozenset({"entropy", "change"})  # gates that fire when the score is <= the threshold (the others: >=)
# Gate kinds whose score is bounded (or a finite count), so that an infinite threshold on the far side can never be
# reached: such a gate never fires (see ResolvedThresholds.none_fires).
BOUNDED_SCORES = frozenset({"max_prob", "entropy", "margin", "patience", "saturation", "change", "q_exit"})


def check_classifier_bundle(bundle: Bundle, command: str, jumps: bool = False) -> None:
    """Raise :class:`BundleError` when ``bundle`` is a decoder bundle (``manifest.decoder`` set): ``command``
    (e.g. ``"eecompile run"``) runs the segment chain of a classifier-style bundle; a decoder bundle generates
    text with ``eecompile generate`` (:class:`eecompile.runtimes.lm.DecoderRunner`). ``jumps``: ``command`` also
    takes a bundle with jump exits (through :class:`eecompile.runtimes.jumps.JumpRunner`)."""
    if bundle.manifest.decoder is not None:
        raise BundleError(f"{bundle.path}: a decoder bundle (kind: decoder); {command} takes bundles compiled from "
                          f"a classifier spec: generate text with `eecompile generate {bundle.path} --prompt TEXT`")
    if bundle.manifest.loop is not None:
        raise BundleError(f"{bundle.path}: a loop bundle (loop: in its spec); {command} would run one step of it: "
                          f"run the loop with eecompile.load(...).run(feeds, steps=N) or `eecompile run --steps N` "
                          f"(eecompile.runtimes.loop.LoopRunner)")
    if bundle.manifest.jumps and not jumps:
        raise BundleError(f"{bundle.path}: a bundle with jump exits (exits[].jump); {command} runs a straight chain: "
                          f"run it with eecompile.load(...) or `eecompile run` (eecompile.runtimes.jumps.JumpRunner)")


def check_policy(policy: str) -> None:
    """Raise :class:`SpecError` unless ``policy`` is one of :data:`POLICIES`."""
    if policy not in POLICIES:
        raise SpecError(f"policy '{policy}' is not one of {', '.join(POLICIES)}")


@dataclass(frozen=True)
class GateSetting:
    """How one gate is run: ``value`` (float) is fed to its threshold input; ``override`` None (the gate decides),
    ``"never"`` (no sample exits here) or ``"always"`` (every sample reaching it exits here)."""

    value: float
    override: str | None = None


@dataclass(frozen=True)
class ResolvedThresholds:
    """One :class:`GateSetting` per early exit, already checked: pass it to ``run`` to skip parsing per call."""

    settings: tuple[GateSetting, ...]
    kinds: tuple[str, ...] = ()
    """Each gate's kind (``GateInfo.kind``), when known."""

    def __len__(self) -> int:
        return len(self.settings)

    def __getitem__(self, k: int) -> GateSetting:
        return self.settings[k]

    @property
    def all_never(self) -> bool:
        """True when no gate can fire (every sample runs to the final exit)."""
        return all(s.override == "never" for s in self.settings)

    @functools.cached_property
    def none_fires(self) -> bool:
        """True when no gate can fire whatever the inputs: every one is overridden to "never", or has a threshold
        that no score of its kind reaches (+inf for a gate that fires at or above its threshold on a bounded
        score: probabilities, margins, cosines, patience counts; -inf for entropy). A ``score`` gate's score is
        a head's raw output, so a threshold of +inf is not taken to mean "never" there."""
        if len(self.kinds) != len(self.settings):
            return self.all_never
        for s, kind in zip(self.settings, self.kinds, strict=True):
            if s.override == "never":
                continue
            if s.override is not None or kind not in BOUNDED_SCORES:
                return False
            if s.value != (-math.inf if kind in FIRES_BELOW else math.inf):
                return False
        return True

    def as_list(self) -> list[float | str]:
        """Per early exit: the number fed, or the override (``"never"``/``"always"``)."""
        return [s.override if s.override else s.value for s in self.settings]


def _gates(exits: Sequence[ExitInfo | GateInfo | None]) -> list[GateInfo]:
    gates: list[GateInfo] = []
    for e in exits:
        gate = e.gate if isinstance(e, ExitInfo) else e
        if gate is not None:
            gates.append(gate)
    return gates


def threshold_problem(kind: str, value: float, overrides: bool = False) -> str | None:
    """Why ``value`` is not a threshold of gate kind ``kind`` (an exit or a loop gate), or None when it is one; the
    one check of the spec (``eecompile.spec``) and the runtime alike.

    Accepted: a number in :data:`THRESHOLD_RANGES` (inclusive; an infinite end is included where the range has one,
    like ``change``'s +inf, which fires on every finite score), and the infinity on the side where the gate never
    fires (+inf; -inf for ``entropy`` and ``change``, which fire below their threshold): calibration stores it to
    mean "never exit here", and the gate still runs. Refused: NaN, a value outside the range, -inf elsewhere, and a
    non-integer ``patience``. ``overrides``: the fix offers ``never``/``always`` too (run-time thresholds). Kinds
    not in the table only need a number."""
    v = float(value)
    alt = ", or 'never'/'always' to override the gate" if overrides else ""
    if math.isnan(v):
        return f"NaN is not a threshold; give a number{alt}"
    below = kind in FIRES_BELOW
    if (v == -math.inf and below) or (v == math.inf and not below):
        return None
    lo, hi = THRESHOLD_RANGES.get(kind, (-math.inf, math.inf))
    if v == -math.inf or not lo <= v <= hi:
        shown = f"[{lo:g}, {hi:g}]" if math.isfinite(lo) else "the finite numbers and +inf"
        return f"threshold {v:g} is outside {shown} for gate kind '{kind}'; give a value in that range{alt}"
    if kind in INTEGER_THRESHOLDS and math.isfinite(v) and not v.is_integer():
        return f"a '{kind}' threshold counts exits; give a positive integer, not {v:g}"
    return None


def check_threshold(kind: str, value: float, where: str) -> float:
    """Return ``value`` as a float after checking it against gate kind ``kind``'s range (:func:`threshold_problem`).
    Raises :class:`ThresholdError` naming ``where``, the range and the fix (a value in it, or an override)."""
    problem = threshold_problem(kind, value, overrides=True)
    if problem is not None:
        raise ThresholdError(f"{where}: {problem}")
    return float(value)


def resolve_thresholds(exits: Sequence[ExitInfo | GateInfo | None],
                       thresholds: None | Threshold | Sequence[Threshold | None] | ResolvedThresholds = None, *,
                       where: str = "thresholds") -> ResolvedThresholds:
    """The one parser of run-time thresholds, for every backend.

    ``exits``: the bundle's exits (``manifest.exits``; entries without a gate, like the final exit, are skipped) or
    their :class:`GateInfo`. ``thresholds``:
      * None: each gate's own threshold from the manifest;
      * a number (int, float or numpy scalar) or ``"never"``/``"always"``: the same for every early exit;
      * a sequence with one entry per early exit: a number, a numeric string (``"0.9"``), ``"never"``, ``"always"``,
        or None (that gate's manifest threshold);
      * a :class:`ResolvedThresholds` (returned as is).
    Numbers are checked per gate kind (:func:`check_threshold`: :data:`THRESHOLD_RANGES`, NaN refused, +inf accepted
    as a number no sample reaches, -inf for entropy). Overrides feed the manifest threshold to the graph.

    Returns a :class:`ResolvedThresholds`. Raises :class:`ThresholdError` (a :class:`SpecError` and a
    :class:`DataError`) naming the entry (``where[i]``) and what to give instead.
    """
    if isinstance(thresholds, ResolvedThresholds):
        return thresholds
    gates = _gates(exits)
    n = len(gates)
    if thresholds is None or isinstance(thresholds, (str, numbers.Real, np.number)):
        per: Sequence[Threshold | None] = [thresholds] * n
    elif isinstance(thresholds, (Sequence, np.ndarray)):
        per = list(thresholds)
        if len(per) != n:
            raise ThresholdError(f"{where}: got {len(per)} values for {n} early exits; give one per exit "
                                 f"(or one number or 'never'/'always' for all)")
    else:
        raise ThresholdError(f"{where}: {type(thresholds).__name__} is not a threshold; give a number, "
                             f"'never'/'always', or a list with one per early exit")
    out: list[GateSetting] = []
    for i, (gate, t) in enumerate(zip(gates, per, strict=True)):
        at = f"{where}[{i}]" if n > 1 or not isinstance(thresholds, (str, numbers.Real, np.number)) else where
        if t is None:
            out.append(GateSetting(check_threshold(gate.kind, gate.threshold, f"manifest exit {i} threshold")))
            continue
        if isinstance(t, str):
            s = t.strip()
            if s in OVERRIDES:
                out.append(GateSetting(float(gate.threshold), s))
                continue
            try:
                t = float(s)
            except ValueError:
                raise ThresholdError(f"{at}: '{t}' is neither a number nor 'never'/'always'") from None
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (numbers.Real, np.number)):
            raise ThresholdError(f"{at}: {t!r} is not a threshold; give a number, 'never' or 'always'")
        out.append(GateSetting(check_threshold(gate.kind, float(t), at)))
    return ResolvedThresholds(tuple(out), tuple(g.kind for g in gates))


FEED_CACHE_SIZE = 64
"""Most accepted feed signatures (dtype and shape of every input) a :func:`check_feeds` cache keeps."""


def check_feeds(inputs: Sequence[TensorInfo], feeds: Mapping[str, Any], where: str = "feeds",
                cache: dict[tuple[Any, ...], int] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Check the model inputs of one call; return them as arrays (in ``inputs`` order) and the batch size.

    ``feeds`` must map exactly the names of ``inputs`` to arrays of their dtype and rank, with fixed dims as
    declared; every input with a batch axis must have the same, non-zero number of samples. Raises
    :class:`DataError` naming the tensor, what was expected and what was given.

    ``cache``: a dict the caller keeps for one list of ``inputs`` (the runner has one); feeds that are a plain dict
    of numpy arrays whose (dtype, shape) signature passed before are accepted without checking again (the checks
    depend on nothing else), at most :data:`FEED_CACHE_SIZE` signatures."""
    if cache is not None and type(feeds) is dict and len(feeds) == len(inputs):
        try:
            arrays = {t.name: feeds[t.name] for t in inputs}
        except KeyError:
            pass
        else:
            key = tuple((a.dtype, a.shape) if type(a) is np.ndarray else None for a in arrays.values())
            n = cache.get(key)
            if n is not None:
                return arrays, n
    out = _check_feeds(inputs, feeds, where)
    if cache is not None and all(type(a) is np.ndarray for a in out[0].values()):
        if len(cache) >= FEED_CACHE_SIZE:
            cache.clear()
        cache[tuple((a.dtype, a.shape) for a in out[0].values())] = out[1]
    return out


def _check_feeds(inputs: Sequence[TensorInfo], feeds: Mapping[str, Any],
                 where: str) -> tuple[dict[str, np.ndarray], int]:
    if not isinstance(feeds, Mapping):
        raise DataError(f"{where} must be a dict of arrays named {sorted(t.name for t in inputs)}")
    names = {t.name for t in inputs}
    missing = [t.name for t in inputs if t.name not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing or extra:
        what = f"missing {sorted(missing)}" if missing else f"unexpected {sorted(extra)}"
        raise DataError(f"{where}: {what}; the model's inputs are {[t.name for t in inputs]}")
    arrays = {t.name: check_array(t, np.asarray(feeds[t.name]), where) for t in inputs}
    return arrays, batch_size_of(arrays, inputs, where)


class SegmentBackend(ABC):
    """Runs the segments of one bundle. Create once (sessions/engines load here), call many times.

    The runner (:class:`~eecompile.runtimes.chain.EarlyExitRunner`) is the only loop over segments; a backend only
    runs one segment on tensors it owns and moves tensors on and off its device. The four abstract methods are
    enough; the others have portable defaults that a device backend overrides to avoid copies and synchronisations.
    """

    name: str = "abstract"
    max_batch: int | None = None
    """Most samples one call of a segment takes (engines built for a max batch), None when unlimited: the runner
    splits larger batches into chunks of this size."""
    reuses_result_buffers: bool = False
    """True when :meth:`result_array` hands out buffers that the next call overwrites (the runner copies out)."""

    def __init__(self, bundle: Bundle, **options: Any) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.options = options
        self._closed = False

    # --- what each backend implements -------------------------------------------------------------
    @abstractmethod
    def run_segment(self, index: int, feeds: dict[str, Any], threshold: float | None) -> dict[str, Any]:
        """Run segment ``index`` on backend-native tensors; return every output of the segment by name.

        ``feeds``: the segment's data inputs by manifest name (model inputs, carried tensors, gate state).
        ``threshold`` is the float fed to the segment's threshold input (None for the final segment, which has
        no gate). May return before the device has finished (asynchronous backends)."""

    @abstractmethod
    def to_host(self, x: Any) -> np.ndarray:
        """Copy a backend-native tensor to a numpy array (waits for the device)."""

    @abstractmethod
    def from_host(self, x: np.ndarray) -> Any:
        """Make a backend-native tensor from a numpy array."""

    @abstractmethod
    def gather(self, x: Any, rows: np.ndarray, axis: int) -> Any:
        """Take ``rows`` (int64 indices, on the host) along ``axis``; stays on the backend's device."""

    # --- hooks with portable defaults -----------------------------------------------------------------
    def upload(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The model inputs of one call (checked host arrays) as backend-native tensors."""
        return {name: self.from_host(a) for name, a in feeds.items()}

    def read_mask(self, x: Any) -> np.ndarray:
        """A gate output (bool [B]) on the host: the one read-back the loop waits for at each gated segment."""
        return self.to_host(x)

    def shape_of(self, x: Any) -> tuple[int, ...]:
        """The shape of a backend-native tensor."""
        shape = x.shape() if callable(getattr(x, "shape", None)) else x.shape
        return tuple(int(d) for d in shape)

    def result_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A host array (batch first) the exited rows of final output ``name`` are written into."""
        return np.empty(shape, dtype)

    def scatter_rows(self, x: Any, rows: np.ndarray, axis: int, out: np.ndarray, dest: np.ndarray) -> None:
        """``out[dest] = x[rows]`` along ``x``'s batch ``axis`` (``out`` is batch first). Device backends may copy
        asynchronously; the data is in ``out`` after :meth:`synchronize`."""
        if isinstance(x, np.ndarray):
            out[dest] = np.moveaxis(np.take(x, rows, axis=axis), axis, 0) if axis else x[rows]
            return
        taken = self.to_host(self.gather(x, rows, axis))
        out[dest] = taken if axis == 0 else np.moveaxis(taken, axis, 0)

    @property
    def has_no_exit(self) -> bool:
        """True when :meth:`run_no_exit` can run (a no-exit graph of the whole chain was loaded)."""
        return False

    def run_no_exit(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the chain's no-exit graph (every segment without heads and gates, as one executable) on the model
        inputs (backend-native, by name); return the final outputs by model output name, laid out as the final
        segment returns them. Only called when :attr:`has_no_exit` is True."""
        raise BackendError(f"the {self.name} backend has no no-exit graph for {self.bundle.path}")

    def synchronize(self) -> None:  # noqa: B027 - optional hook
        """Wait until every copy and segment enqueued so far has finished (no-op for synchronous backends)."""

    def close(self) -> None:
        """Release sessions, contexts and device memory. Later calls raise :class:`BackendError`."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def check_open(self) -> None:
        """Raise :class:`BackendError` when this backend was closed."""
        if self._closed:
            raise BackendError(f"this {self.name} runtime for {self.bundle.path} was closed; load the bundle again "
                               f"(eecompile.load) to run it")

    # --- context manager ----------------------------------------------------------------------------
    def __enter__(self) -> SegmentBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
