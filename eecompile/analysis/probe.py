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


def batched_inputs(inputs: list[ir.Value]) -> set[str]:
    """The inputs whose axis 0 is symbolic: the batched ones. An input with a fixed axis 0 (a ``bool[1]``
    flag, a ``[1, T]`` table) or none (a scalar) has no batch axis and is fed as given."""
    return {v.name or "" for v in inputs if v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int)}


def random_inputs(inputs: list[ir.Value], batch: int, dims: Mapping[str, int] | None = None,
                  seed: int = 0, batched: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Inputs for probing and verification: N(0,1) floats, ones for integers (ids and masks stay valid),
    True for booleans. Axis 0 of the ``batched`` inputs (default: :func:`batched_inputs`) is ``batch``; the
    other inputs keep their declared shape and get the same values whatever ``batch`` and ``seed`` are (they
    do not depend on the batch). Other symbolic dims take ``dims[name]`` or DEFAULT_DIM."""
    rng = np.random.default_rng(seed)
    batched = batched_inputs(inputs) if batched is None else set(batched)
    feeds: dict[str, np.ndarray] = {}
    for v in inputs:
        if v.shape is None:
            raise GraphError(f"model input '{v.name}' has no shape; export the model with input shapes")
        in_batch = (v.name or "") in batched
        shape: list[int] = []
        for i, d in enumerate(v.shape):
            if i == 0 and in_batch:
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
                dims: Mapping[str, int] | None = None) -> ProbeResult:
    """Run ``model`` at each batch size with ``names`` exposed and classify every tensor."""
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
    result = ProbeResult(batches=batches)
    for b in batches:
        feeds = random_inputs(inputs, b, dims, seed=b)
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
    _find_symbolic_axes(sess, out_names, inputs, batches[0], dims, result)
    return result


def _symbolic_dims(inputs: list[ir.Value]) -> set[str]:
    """Names of the symbolic non-batch dims of the inputs (sequence length and the like)."""
    return {str(d) for v in inputs if v.shape is not None for i, d in enumerate(v.shape)
            if i > 0 and not isinstance(d, int)}


def _find_symbolic_axes(sess: Any, out_names: list[str], inputs: list[ir.Value], batch: int,
                        dims: Mapping[str, int] | None, result: ProbeResult) -> None:
    """One more run with every symbolic non-batch input dim one smaller (one larger below 3: a smaller size
    stays within position tables): the axes that follow are symbolic, named after the input dim whose size
    they had (else ``d{axis}``)."""
    syms = _symbolic_dims(inputs)
    if not syms:
        return
    base = {s: int((dims or {}).get(s, DEFAULT_DIM)) for s in syms}
    other = {s: n - 1 if n >= 3 else n + 1 for s, n in base.items()}
    feeds = random_inputs(inputs, batch, other, seed=batch)
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
    if len(batches) == 1:  # per-sample mode: nothing is ever compacted
        shape = f.shapes[batches[0]]
        f.batch_axis = 0 if shape and shape[0] == 1 else None
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
