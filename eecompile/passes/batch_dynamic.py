"""Make the batch dimension dynamic, where the graph allows it safely.

Cases:
1. Inputs already batch-dynamic (axis 0 symbolic): nothing to rewrite; the symbol is kept.
2. Inputs exported with a fixed batch (model zoos: ``[1, 3, 224, 224]``): axis 0 of every input and output
   becomes the symbol ``batch``, intermediate shapes are cleared and re-inferred, and constant Reshape
   targets that hard-code the old batch (``[1, 2048]``) get ``0`` there ("copy the input's dim").
3. The rewrite is only kept if it is *safe*: the rewritten model at batch 3 must give the same outputs as the
   original model run on each sample alone. Otherwise the original graph is kept and the bundle runs in
   ``per_sample`` mode (the runtime feeds one sample at a time); ``inspect`` says which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from eecompile.errors import GraphError
from eecompile.analysis.probe import random_inputs

log = logging.getLogger(__name__)

BATCH = "batch"


@dataclass
class BatchResult:
    model: ir.Model
    mode: str  # "dynamic" or "per_sample"
    rewritten: bool  # whether the graph was changed to get there
    reason: str = ""


def _batch_symbol(inputs: list[ir.Value]) -> str | None:
    """The symbol already on axis 0 of the inputs, or None if any input has a fixed or missing axis 0."""
    syms = set()
    for v in inputs:
        if v.shape is not None and len(v.shape) == 0:
            continue  # a scalar input (a flag, a temperature) has no batch axis
        if v.shape is None:
            return None
        d = v.shape[0]
        if isinstance(d, int):
            return None
        syms.add(str(d))
    return syms.pop() if len(syms) == 1 else None


def infer_shapes(model: ir.Model) -> ir.Model:
    """onnx shape inference through onnx-ir; failures are logged (later checks run the model for real)."""
    try:
        result = ShapeInferencePass()(model)
        return result.model
    except Exception as e:  # shape inference is advisory here
        log.info("shape inference failed: %s", e)
        return model


def make_batch_dynamic(model: ir.Model, dims: dict[str, int] | None = None,
                       reload: Callable[[], ir.Model] | None = None) -> BatchResult:
    """``reload`` gives the untouched model again when the rewrite has to be undone (default: a copy kept
    in memory, which holds the weights twice; pass a reload for large models)."""
    inputs = list(model.graph.inputs)
    if not inputs:
        raise GraphError("the model has no inputs")
    if _batch_symbol(inputs) is not None:
        return BatchResult(model, "dynamic", rewritten=False)
    fixed = {v.name: v.shape[0] if v.shape is not None else None for v in inputs
             if v.shape is None or len(v.shape) > 0}
    old_batches = {d for d in fixed.values() if isinstance(d, int)}
    if old_batches != {1}:
        return BatchResult(model, "per_sample", rewritten=False,
                           reason=f"inputs have no common batch axis 0 of size 1 ({fixed})")
    original = None if reload is not None else ir.from_proto(ir.to_proto(model))
    for v in list(model.graph.inputs) + list(model.graph.outputs):
        if v.shape is not None and len(v.shape) > 0:
            v.shape = ir.Shape([BATCH, *list(v.shape)[1:]])
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for v in node.outputs:
            if v not in outputs:
                v.shape = None
        if node.op_type == "Reshape" and len(node.inputs) > 1 and node.inputs[1] is not None:
            _fix_reshape_target(node)
    model = infer_shapes(model)
    ok, reason = _same_as_per_sample(original, model, dims, reload)
    if not ok:
        log.info("keeping batch 1: %s", reason)
        undone = original if original is not None else reload()  # type: ignore[misc]
        return BatchResult(undone, "per_sample", rewritten=False, reason=reason)
    return BatchResult(model, "dynamic", rewritten=True)


def _fix_reshape_target(node: ir.Node) -> None:
    """A constant target whose first entry is the old batch (1) becomes 0: copy axis 0 from the input."""
    if node.attributes.get_int("allowzero", 0):
        return
    target = node.inputs[1]
    assert target is not None
    const = target.const_value
    if const is None or len(target.uses()) != 1:
        return
    arr = const.numpy()
    if arr.ndim != 1 or arr.size < 1 or int(arr[0]) != 1:
        return
    new = arr.copy()
    new[0] = 0
    target.const_value = ir.tensor(new, name=target.name)


def _same_as_per_sample(original: ir.Model | None, dynamic: ir.Model, dims: dict[str, int] | None,
                        reload: Callable[[], ir.Model] | None) -> tuple[bool, str]:
    from eecompile.passes.session import session_from_model

    feeds = random_inputs(list(dynamic.graph.inputs), 3, dims, seed=7)
    # One session at a time: the weights are in memory once per live session.
    try:
        s_dyn = session_from_model(dynamic, what="the batch-dynamic model")
        batched = s_dyn.run(None, feeds)
        del s_dyn
    except Exception as e:
        return False, f"the graph does not run at batch 3 once made dynamic ({str(e).splitlines()[0]})"
    src = original if original is not None else reload()  # type: ignore[misc]
    s_orig = session_from_model(src, what="the model")
    singles = [s_orig.run(None, {k: v[i:i + 1] if v.ndim else v for k, v in feeds.items()}) for i in range(3)]
    del s_orig, src
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
