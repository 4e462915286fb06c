"""Make the batch dimension dynamic, where the graph allows it safely.

Cases:
1. Inputs already batch-dynamic (a symbolic dim that is not a batch-1 export's sequence length): nothing to
   rewrite; the symbol is kept. Which symbolic dim is the batch is measured when there are several
   (:func:`~eecompile.analysis.probe.measure_batch_symbol`: samples along it never mix), so a time-major
   ``[T, B, F]`` input has its batch on axis 1. Inputs without that dim (a ``bool[1]`` flag, a ``[1, T]``
   table, a scalar) have no batch axis: they are fed as given to every segment that reads them and never
   force per-sample mode.
2. Inputs exported with a fixed batch (model zoos: ``[1, 3, 224, 224]``): axis 0 of every input and output
   becomes the symbol ``batch``, intermediate shapes are cleared and re-inferred, and constant Reshape
   targets that hard-code the old batch (``[1, 2048]``) get ``0`` there ("copy the input's dim").
3. The rewrite is only kept if it is *safe*: the rewritten model at batch 3 must give the same outputs as the
   original model run on each sample alone. Otherwise the original graph is kept and the bundle runs in
   ``per_sample`` mode (the runtime feeds one sample at a time); ``inspect`` says which.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from eecompile.analysis.probe import InputAxes, input_symbols, measure_batch_symbol, random_inputs
from eecompile.errors import GraphError

log = logging.getLogger(__name__)

BATCH = "batch"


@dataclass
class BatchResult:
    """What :class:`BatchDynamicPass` did: ``mode`` is ``"dynamic"`` or ``"per_sample"``; ``rewritten`` says
    whether the graph was changed to get there; ``reason`` why a fixed batch was kept."""

    model: ir.Model
    mode: str
    rewritten: bool
    reason: str = ""
    unbatched: list[str] = field(default_factory=list)  # inputs with no batch axis (fed as given)
    axes: InputAxes = field(default_factory=dict)  # each input's batch axis (None: fed as given)
    measured: str = ""  # where the batch was measured to be, when not axis 0 of every batched input

    @property
    def note(self) -> str:
        """One line for the manifest's notes."""
        if self.mode == "per_sample":
            return f"batch fixed at 1, runs one sample at a time: {self.reason}"
        note = "batch made dynamic (the model was exported with batch 1)" if self.rewritten else "batch-dynamic"
        if self.measured:
            note += f"; {self.measured}"
        if self.unbatched:
            note += f"; inputs without a batch axis, fed as given: {', '.join(self.unbatched)}"
        return note


def _sample_axes(inputs: list[ir.Value]) -> InputAxes:
    """Per-sample mode with a fixed shape whose axis 0 is not 1 (a time-major ``[T, 1, F]`` export at batch 1):
    each input's batch axis is its first axis of size 1 (0 where axis 0 is 1 or not fixed), None for an input
    without one (fed as given).

    Raises:
        GraphError: no input has such an axis (no batch of one to feed samples along)."""
    axes: InputAxes = {}
    for v in inputs:
        dims = list(v.shape) if v.shape is not None else []
        if not dims:
            axes[v.name or ""] = None if v.shape is not None else 0
            continue
        ones = [i for i, d in enumerate(dims) if not isinstance(d, int) or d == 1]
        axes[v.name or ""] = 0 if 0 in ones else (ones[0] if ones else None)
    if all(a is None for a in axes.values()):
        shapes = {v.name: list(v.shape) if v.shape is not None else None for v in inputs}
        raise GraphError(f"no model input has a batch axis (an axis of size 1 or a symbolic one): {shapes}; export "
                         f"the model with a batch axis (e.g. torch.onnx.export(..., dynamic_axes={{NAME: {{0: "
                         f"'batch'}}}}))")
    return axes


def _already_dynamic(inputs: list[ir.Value]) -> bool:
    """Case 1: every input has a shape and some input has a named symbolic dim, unless it is a batch-1 export
    whose only symbols are non-batch dims (every axis 0 fixed at 1: ``[1, seq]``), which is case 2."""
    if any(v.shape is None for v in inputs) or not input_symbols(inputs):
        return False
    axis0 = [v.shape[0] for v in inputs if v.shape is not None and len(v.shape)]
    return not all(isinstance(d, int) and d == 1 for d in axis0)


def infer_shapes(model: ir.Model) -> ir.Model:
    """onnx shape inference through onnx-ir, in place; failures are logged (later checks run the model)."""
    return InferShapesPass()(model).model


class InferShapesPass(ir.passes.InPlacePass):
    """Static shape inference (onnx's, through onnx-ir) where it succeeds; a model it fails on is kept as is
    (the probe reads real shapes off ONNX Runtime later)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            return ShapeInferencePass()(model)
        except Exception as e:  # shape inference is advisory here
            log.info("shape inference failed: %s", e)
            return ir.passes.PassResult(model, modified=False)


class BatchDynamicPass(ir.passes.InPlacePass):
    """Make axis 0 of a fixed-batch model symbolic, where that is safe (cases 1-3 of the module docstring).

    After the pass, :attr:`result` says what it did (``mode``, ``rewritten``, ``reason``, ``note``).
    The check runs the untouched model once per sample *before* the rewrite and the rewritten model at
    batch 3 after it; an unsafe rewrite is undone in place, so the weights are never held twice.

    Raises:
        GraphError: the model has no inputs, ONNX Runtime cannot run the untouched model, or samples mix along
            every symbolic input dim (:func:`~eecompile.analysis.probe.measure_batch_symbol`).
    """

    def __init__(self, dims: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.dims = dims
        self.result: BatchResult | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.result = self._run(model)
        return ir.passes.PassResult(model, modified=self.result.rewritten)

    def _run(self, model: ir.Model) -> BatchResult:
        inputs = list(model.graph.inputs)
        if not inputs:
            raise GraphError("the model has no inputs")
        if _already_dynamic(inputs):  # case 1
            sym = measure_batch_symbol(model, self.dims)
            assert sym is not None
            unbatched = [name for name, axis in sym.axes.items() if axis is None]
            return BatchResult(model, "dynamic", rewritten=False, unbatched=unbatched, axes=sym.axes,
                               measured=sym.note)
        axes0: InputAxes = {v.name or "": 0 if v.shape is not None and len(v.shape) else None for v in inputs}
        fixed = {v.name: v.shape[0] if v.shape is not None else None for v in inputs
                 if v.shape is None or len(v.shape) > 0}
        if {d for d in fixed.values() if isinstance(d, int)} != {1}:
            return BatchResult(model, "per_sample", rewritten=False,
                               reason=f"inputs have no common batch axis 0 of size 1 ({fixed})",
                               axes=_sample_axes(inputs))
        feeds = random_inputs(inputs, 3, self.dims, seed=7, batched=[v.name or "" for v in inputs if v.shape])
        singles, single_error = _per_sample_outputs(model, feeds)
        undo = _Undo(model)
        for v in list(model.graph.inputs) + list(model.graph.outputs):  # case 2
            if v.shape is not None and len(v.shape) > 0:
                v.shape = ir.Shape([BATCH, *list(v.shape)[1:]])
        outputs = set(model.graph.outputs)
        for node in model.graph:
            for v in node.outputs:
                if v not in outputs:
                    v.shape = None
            if node.op_type == "Reshape" and len(node.inputs) > 1 and node.inputs[1] is not None:
                _fix_reshape_target(node, undo)
        infer_shapes(model)
        ok, reason = _same_as_per_sample(model, feeds, singles, single_error)  # case 3
        if not ok:
            log.info("keeping batch 1: %s", reason)
            undo.restore()
            return BatchResult(model, "per_sample", rewritten=False, reason=reason, axes=axes0)
        return BatchResult(model, "dynamic", rewritten=True, axes=axes0)


def make_batch_dynamic(model: ir.Model, dims: Mapping[str, int] | None = None) -> BatchResult:
    """Run :class:`BatchDynamicPass` on ``model`` (in place) and return what it did."""
    p = BatchDynamicPass(dims)
    p(model)
    assert p.result is not None
    return p.result


class _Undo:
    """The shapes and types of every value and the Reshape targets the rewrite touches, to put them back."""

    def __init__(self, model: ir.Model) -> None:
        values = [v for g in model.graphs()
                  for v in [*g.inputs, *g.initializers.values(), *(o for n in g for o in n.outputs)]]
        self.values = [(v, v.shape, v.type) for v in values]
        self.consts: list[tuple[ir.Value, ir.TensorProtocol]] = []

        self.attrs: list[tuple[ir.Node, ir.Attr]] = []  # Constant nodes whose value was rewritten

    def restore(self) -> None:
        for v, shape, typ in self.values:
            v.shape, v.type = shape, typ
        for v, const in self.consts:
            v.const_value = const
        for node, attr in self.attrs:
            node.attributes["value"] = attr


def _fix_reshape_target(node: ir.Node, undo: _Undo) -> None:
    """A constant target whose first entry is the old batch (1) becomes 0: copy axis 0 from the input."""
    if node.attributes.get_int("allowzero", 0):
        return
    target = node.inputs[1]
    assert target is not None
    if len(target.uses()) != 1:
        return
    const = target.const_value
    producer = target.producer()
    attr = None
    if const is None and producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")  # torch writes Reshape targets as Constant nodes
        const = attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None
    if const is None:
        return
    arr = const.numpy()
    if arr.ndim != 1 or arr.size < 1 or int(arr[0]) != 1:
        return
    new = arr.copy()
    new[0] = 0
    if attr is not None and producer is not None:
        undo.attrs.append((producer, attr))
        producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(new, name=target.name))
        return
    undo.consts.append((target, const))
    target.const_value = ir.tensor(new, name=target.name)


def _per_sample_outputs(model: ir.Model, feeds: dict[str, np.ndarray]
                        ) -> tuple[list[list[np.ndarray]], GraphError | None]:
    """The untouched model run on each sample of ``feeds`` alone (or the error ONNX Runtime gave)."""
    from eecompile.passes.session import session_from_model

    try:
        sess = session_from_model(model, what="the model")
    except GraphError as e:
        return [], e
    rows = range(3)  # the batch of ``feeds``
    return [sess.run(None, {k: v[i:i + 1] if v.ndim else v for k, v in feeds.items()}) for i in rows], None


def _same_as_per_sample(dynamic: ir.Model, feeds: dict[str, np.ndarray], singles: list[list[np.ndarray]],
                        single_error: GraphError | None) -> tuple[bool, str]:
    import onnxruntime as ort

    from eecompile.passes.session import session_from_model

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a rewrite that does not run is an expected outcome, reported below
    try:
        batched = session_from_model(dynamic, what="the batch-dynamic model").run(None, feeds, quiet)
    except Exception as e:
        return False, f"the graph does not run at batch 3 once made dynamic ({str(e).splitlines()[0]})"
    if single_error is not None:
        raise single_error
    for j, out in enumerate(batched):
        ref = np.concatenate([s[j] for s in singles], axis=0)
        if out.shape != ref.shape:
            return False, f"output {j} has shape {out.shape} at batch 3, expected {ref.shape}"
        scale = max(float(np.max(np.abs(ref))), 1e-6) if ref.size and ref.dtype.kind == "f" else 1.0
        if ref.dtype.kind == "f" and float(np.max(np.abs(out - ref))) > 1e-4 * scale:
            return False, f"output {j} differs at batch 3 from per-sample runs (samples are mixed)"
        if ref.dtype.kind != "f" and not np.array_equal(out, ref):
            return False, f"output {j} differs at batch 3 from per-sample runs"
    return True, ""
