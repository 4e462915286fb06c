"""Run a model in ONNX Runtime with every intermediate tensor exposed, at two batch sizes.

Static shape inference loses symbolic dims (through Reshape, Shape arithmetic), so the facts the splitter
needs are read off real runs instead:

1. the batch axis of each tensor: the one axis whose size is the batch size at both batch sizes;
2. tensors that *fold* the batch into another axis (``[B*T, C]`` after a flattening Gemm): some axis changes
   with the batch but is not the batch — such tensors cannot be carried (no axis to drop samples along);
3. tensors with no batch axis whose *value* still changes with the batch (a ``Shape`` output, a Reshape
   target built with Concat): carried across a compaction they would hand the next Reshape a stale batch
   size, so they are never carried;
4. concrete shapes for counting FLOPs (per sample: the difference between the two runs).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from eecompile.errors import GraphError

PROBE_BATCHES = (2, 3)
DEFAULT_DIM = 8  # size given to symbolic non-batch dims (sequence length and the like) while probing


@dataclass
class TensorFacts:
    """What the probe saw of one tensor: its numpy dtype name, its concrete shape and a digest of its values at
    each probed batch size, the batch axis found (cases 1-3), why it cannot be carried (None: it can), and
    the axes that follow a symbolic input dim, by the dim's name."""

    name: str
    dtype: str
    shapes: dict[int, tuple[int, ...]]  # batch size -> concrete shape
    digests: dict[int, str]  # batch size -> sha1 of the values
    batch_axis: int | None = None
    problem: str | None = None  # why this tensor cannot be carried across a compaction (None: it can)
    symbolic: dict[int, str] = field(default_factory=dict)  # non-batch axes that follow a symbolic input dim


@dataclass
class ProbeResult:
    """The facts of every probed tensor (by name) and the batch sizes probed (``(2, 3)``; ``(1,)`` per sample)."""

    batches: tuple[int, ...]
    facts: dict[str, TensorFacts] = field(default_factory=dict)

    def shape(self, name: str, batch: int | None = None) -> tuple[int, ...] | None:
        """The concrete shape of ``name`` at ``batch`` (default: the first probed), None if not probed."""
        f = self.facts.get(name)
        if f is None:
            return None
        return f.shapes[batch if batch is not None else self.batches[0]]


InputAxes = dict[str, int | None]
"""Each model input's batch axis, by name (None: the input has no batch axis and is fed as given)."""

_BATCH_LIKE = re.compile(r"(?i)^(n|b|bs|batch.*|.*batch|.*batch_size)$")
INDEPENDENCE_TOLERANCE = 1e-3  # relative to an output's scale: far above float32 reassociation, far below mixing


def batched_inputs(inputs: list[ir.Value]) -> set[str]:
    """The inputs with a batch axis under :func:`guess_batch_axes` (a static guess: nothing is run)."""
    return {name for name, axis in guess_batch_axes(inputs).items() if axis is not None}


def symbol_axes(inputs: list[ir.Value], symbol: str) -> InputAxes:
    """Each input's axis holding the symbolic dim ``symbol`` (the first, if it holds it twice); None for the
    inputs without it (a ``bool[1]`` flag, a ``[1, T]`` table, a scalar: fed as given)."""
    out: InputAxes = {}
    for v in inputs:
        axes = [i for i, d in enumerate(v.shape or []) if not isinstance(d, int) and str(d) == symbol]
        out[v.name or ""] = axes[0] if axes else None
    return out


def guess_batch_axes(inputs: list[ir.Value]) -> InputAxes:
    """The batch axes read off the declared shapes alone, for inputs nobody measured: the axis of the symbol
    ``batch`` where an input has it (what the compiler writes in segments and manifests), else axis 0 where it
    is symbolic, else none."""
    if any(not isinstance(d, int) and str(d) == "batch" for v in inputs for d in (v.shape or [])):
        return symbol_axes(inputs, "batch")
    return {v.name or "": 0 if v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int) else None
            for v in inputs}


def input_symbols(inputs: list[ir.Value]) -> list[str]:
    """The named symbolic dims of the inputs, in order of first appearance."""
    return list(dict.fromkeys(str(d) for v in inputs for d in (v.shape or [])
                              if not isinstance(d, int) and d.value is not None))


@dataclass
class BatchSymbol:
    """The symbolic input dim measured to be the batch: ``symbol``, each input's axis holding it (``axes``) and
    what the measurement saw of the other candidates (``rejected``: symbol -> why it is not the batch)."""

    symbol: str
    axes: InputAxes
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def note(self) -> str:
        """A few words for the manifest: where the batch is when it is not axis 0 of every batched input."""
        off = [f"{n} on axis {a}" for n, a in self.axes.items() if a not in (None, 0)]
        return f"batch axis measured ({', '.join(off)})" if off else ""


def measure_batch_symbol(model: ir.Model, dims: Mapping[str, int] | None = None) -> BatchSymbol | None:
    """Which symbolic dim of the inputs is the batch, measured: the model runs at size 3 along each candidate
    symbol, then once per sample (size 1, that sample's slice along the same axes), and the candidate is the
    batch when every output is the per-sample outputs stacked along one axis (within
    :data:`INDEPENDENCE_TOLERANCE` of the scale), i.e. samples along it never mix. A time axis fails this (an
    LSTM or a convolution over time mixes steps), so a time-major ``[T, B, F]`` input gets batch axis 1.

    One candidate is checked the same way (a lone symbolic dim can be a time axis: a ``[T, F]`` sequence
    model has no batch at all); None when the inputs have no named symbolic dim. Several passing (a model that never mixes along either): a batch-like name (``batch``, ``N``, ``B``...)
    first, then the symbol on axis 0 of most inputs.

    Raises:
        GraphError: every candidate runs but mixes samples (no axis along which samples can be dropped).
    """
    inputs = list(model.graph.inputs)
    cands = input_symbols(inputs)
    if not cands:
        return None
    from eecompile.passes.session import session_from_model

    sess = session_from_model(model, optimize=False, what="the model")
    names = [o.name for o in sess.get_outputs()]
    rejected: dict[str, str] = {}
    ran: set[str] = set()
    for s in cands:
        axes = symbol_axes(inputs, s)
        problem, did_run = _mixes_samples(sess, names, inputs, axes, s, dims)
        if did_run:
            ran.add(s)
        if problem is not None:
            rejected[s] = problem
    passing = [s for s in cands if s not in rejected]

    def at_axis0(s: str) -> int:
        return sum(1 for v in inputs if v.shape is not None and len(v.shape) and str(v.shape[0]) == s)

    if passing:
        best = max(passing, key=lambda s: (bool(_BATCH_LIKE.match(s)), at_axis0(s), -cands.index(s)))
        return BatchSymbol(best, symbol_axes(inputs, best), rejected)
    guess = max(cands, key=lambda s: (at_axis0(s), bool(_BATCH_LIKE.match(s)), -cands.index(s)))
    if guess not in ran:  # the model does not run at these sizes: the probe reports that with its own error
        return BatchSymbol(guess, symbol_axes(inputs, guess), rejected)
    listed = "; ".join(f"'{s}': {why}" for s, why in rejected.items())
    raise GraphError(f"no symbolic input dim keeps samples independent ({listed}), so no axis exists along which "
                     f"samples can be dropped; export the model with a batch axis whose samples do not interact")


def _mixes_samples(sess: Any, names: list[str], inputs: list[ir.Value], axes: InputAxes, symbol: str,
                   dims: Mapping[str, int] | None) -> tuple[str | None, bool]:
    """(why samples along ``symbol`` are not independent, or None; whether the model ran at all)."""
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a candidate that cannot be sliced fails here by design
    sizes = {k: v for k, v in (dims or {}).items() if k != symbol}
    feeds = random_inputs(inputs, 3, sizes, seed=17, batched=axes)
    try:
        whole = sess.run(names, feeds, quiet)
        parts = [sess.run(names, {k: v if axes.get(k) is None else np.take(v, [i], axis=axes[k])
                                  for k, v in feeds.items()}, quiet) for i in range(3)]
    except Exception as e:  # noqa: BLE001 - not runnable this way: not the batch
        return f"the model does not run when it is sliced along it ({str(e).splitlines()[0][:120]})", False
    for j, out in enumerate(whole):
        singles = [np.asarray(p[j]) for p in parts]
        if not _stacked(np.asarray(out), singles):
            return f"output '{names[j]}' at size 3 is not its per-sample outputs stacked (samples mix)", True
    return None, True


def _stacked(out: np.ndarray, singles: list[np.ndarray]) -> bool:
    """Whether ``out`` equals ``singles`` stacked along one axis (or, for an output without it, each of them)."""
    one = singles[0]
    if any(s.shape != one.shape for s in singles) or out.ndim != one.ndim:
        return False
    axes = [a for a in range(out.ndim) if out.shape[a] == len(singles) and one.shape[a] == 1
            and out.shape[:a] + out.shape[a + 1:] == one.shape[:a] + one.shape[a + 1:]]
    refs = [np.concatenate(singles, axis=a) for a in axes] if axes else ([one] if out.shape == one.shape else [])
    if not axes and out.shape == one.shape and not all(_close(s, one) for s in singles[1:]):
        return False
    return any(_close(out, r) for r in refs)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind not in "fc":
        return bool(np.array_equal(a, b))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not (np.isfinite(a64).all() and np.isfinite(b64).all()):
        return bool(np.array_equal(np.isnan(a64), np.isnan(b64))) and bool(
            np.allclose(np.nan_to_num(a64), np.nan_to_num(b64), rtol=INDEPENDENCE_TOLERANCE, atol=0))
    scale = max(float(np.max(np.abs(b64))) if b64.size else 0.0, 1e-6)
    return float(np.max(np.abs(a64 - b64))) <= INDEPENDENCE_TOLERANCE * scale if a64.size else True


def random_inputs(inputs: list[ir.Value], batch: int, dims: Mapping[str, int] | None = None,
                  seed: int = 0, batched: Mapping[str, int | None] | Collection[str] | None = None
                  ) -> dict[str, np.ndarray]:
    """Inputs for probing and verification: N(0,1) floats, ones for integers (ids and masks stay valid),
    True for booleans. ``batched``: each input's batch axis (a mapping, e.g. :attr:`BatchSymbol.axes`), or the
    names of the inputs batched on axis 0, or None for :func:`guess_batch_axes`; that axis has size ``batch``.
    The other inputs keep their declared shape and get the same values whatever ``batch`` and ``seed`` are
    (they do not depend on the batch). Other symbolic dims take ``dims[name]`` or DEFAULT_DIM."""
    rng = np.random.default_rng(seed)
    if batched is None:
        axes: Mapping[str, int | None] = guess_batch_axes(inputs)
    elif isinstance(batched, Mapping):
        axes = batched
    else:
        axes = {name: 0 for name in batched}
    feeds: dict[str, np.ndarray] = {}
    for v in inputs:
        if v.shape is None:
            raise GraphError(f"model input '{v.name}' has no shape; export the model with input shapes")
        axis = axes.get(v.name or "")
        in_batch = axis is not None
        shape: list[int] = []
        for i, d in enumerate(v.shape):
            if i == axis:
                shape.append(batch)
            elif isinstance(d, int):
                shape.append(d)
            else:
                shape.append(int((dims or {}).get(str(d), DEFAULT_DIM)))
        name = v.name or ""
        np_dtype = _np_dtype(v.dtype, name)
        if np.issubdtype(np_dtype, np.floating):
            gen = rng if in_batch else np.random.default_rng(zlib.crc32(name.encode()))
            feeds[name] = gen.standard_normal(shape).astype(np_dtype)
        elif np_dtype == np.bool_:
            feeds[name] = np.ones(shape, dtype=np.bool_)
        else:
            feeds[name] = np.ones(shape, dtype=np_dtype)
    return feeds


def _np_dtype(dtype: ir.DataType | None, name: str | None) -> np.dtype:
    if dtype is None:
        raise GraphError(f"tensor '{name}' has no element type")
    try:
        return np.dtype(dtype.numpy())
    except Exception as e:
        raise GraphError(f"tensor '{name}' has element type {dtype} that numpy cannot hold") from e


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


def probe_model(model: ir.Model, names: list[str], batches: tuple[int, ...] = PROBE_BATCHES,
                dims: Mapping[str, int] | None = None, axes: Mapping[str, int | None] | None = None) -> ProbeResult:
    """Run ``model`` at each batch size with ``names`` exposed and classify every tensor. ``axes``: each input's
    batch axis (:attr:`BatchSymbol.axes`; default :func:`guess_batch_axes`), the axis the batch size is put on."""
    from eecompile.passes.session import session_from_model

    if any(v.dtype is None for node in model.graph for v in node.outputs):
        from onnx_ir.passes.common import ShapeInferencePass

        try:
            model = ShapeInferencePass()(model).model
        except Exception:  # noqa: BLE001 - untyped tensors are simply not probed
            pass
    values = {v.name: v for node in model.graph for v in node.outputs if v.name}
    extra = [values[n] for n in names if n in values and values[n].dtype is not None
             and isinstance(values[n].type, ir.TensorType)]
    sess = session_from_model(model, extra, optimize=False)
    out_names = [o.name for o in sess.get_outputs()]
    inputs = list(model.graph.inputs)
    axes = dict(axes) if axes is not None else guess_batch_axes(inputs)
    result = ProbeResult(batches=batches)
    for b in batches:
        feeds = random_inputs(inputs, b, dims, seed=b, batched=axes)
        try:
            outs = sess.run(out_names, feeds)
        except Exception as e:
            raise GraphError(f"ONNX Runtime failed to run the model at batch {b}: {str(e).splitlines()[0]}") from e
        # The inputs too: FLOPs of a MatMul that reads an input need its shape.
        for name, arr in [*zip(out_names, outs, strict=True), *feeds.items()]:
            arr = np.asarray(arr)
            f = result.facts.get(name)
            if f is None:
                f = result.facts[name] = TensorFacts(name, str(arr.dtype), {}, {})
            f.shapes[b] = tuple(int(d) for d in arr.shape)
            f.digests[b] = _digest(arr)
        del outs
    for f in result.facts.values():
        _classify(f, batches)
    _find_symbolic_axes(sess, out_names, inputs, batches[0], dims, result, axes)
    return result


def _symbolic_dims(inputs: list[ir.Value], axes: Mapping[str, int | None]) -> set[str]:
    """Names of the symbolic non-batch dims of the inputs (sequence length and the like)."""
    return {str(d) for v in inputs if v.shape is not None for i, d in enumerate(v.shape)
            if i != axes.get(v.name or "") and not isinstance(d, int)}


def _find_symbolic_axes(sess: Any, out_names: list[str], inputs: list[ir.Value], batch: int,
                        dims: Mapping[str, int] | None, result: ProbeResult,
                        axes: Mapping[str, int | None]) -> None:
    """One more run with every symbolic non-batch input dim one smaller (one larger below 3: a smaller size
    stays within position tables): the axes that follow are symbolic, named after the input dim whose size
    they had (else ``d{axis}``)."""
    syms = _symbolic_dims(inputs, axes)
    if not syms:
        return
    base = {s: int((dims or {}).get(s, DEFAULT_DIM)) for s in syms}
    other = {s: n - 1 if n >= 3 else n + 1 for s, n in base.items()}
    feeds = random_inputs(inputs, batch, other, seed=batch, batched=axes)
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failure here is expected for some models and handled below
    try:
        outs = sess.run(out_names, feeds, quiet)
    except Exception:  # noqa: BLE001 - a model that only runs at one size keeps its probed sizes fixed
        return
    by_size = {n: s for s, n in base.items()}
    for name, arr in [*zip(out_names, outs, strict=True), *feeds.items()]:
        f = result.facts.get(name)
        if f is None:
            continue
        before, after = f.shapes[batch], tuple(int(d) for d in np.asarray(arr).shape)
        if len(before) != len(after):
            continue
        for axis, (a, b) in enumerate(zip(before, after, strict=True)):
            if a != b and axis != f.batch_axis:
                f.symbolic[axis] = by_size.get(a, f"d{axis}")


def _classify(f: TensorFacts, batches: tuple[int, ...]) -> None:
    if len(batches) == 1:  # per-sample mode: nothing is ever compacted; the batch of one is the first axis of 1
        shape = f.shapes[batches[0]]
        f.batch_axis = next((i for i, d in enumerate(shape) if d == 1), None)  # a time-major [T, 1, C]: axis 1
        return
    b0, b1 = batches[0], batches[1]
    s0, s1 = f.shapes[b0], f.shapes[b1]
    if len(s0) != len(s1):
        f.problem = f"its rank changes with the batch size ({list(s0)} at batch {b0}, {list(s1)} at {b1})"
        return
    changed = [a for a in range(len(s0)) if s0[a] != s1[a]]
    if not changed:
        f.batch_axis = None
        if f.digests[b0] != f.digests[b1]:
            f.problem = ("it has no batch axis but its value changes with the batch size "
                         "(shape arithmetic such as a Shape output or a Reshape target)")
        return
    if len(changed) == 1 and s0[changed[0]] == b0 and s1[changed[0]] == b1:
        f.batch_axis = changed[0]
        return
    f.problem = (f"it folds the batch into another axis ({list(s0)} at batch {b0}, {list(s1)} at {b1}), "
                 f"so samples cannot be dropped from it")
