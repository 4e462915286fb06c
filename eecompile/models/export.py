"""Export a PyTorch early-exit model to ONNX with its exit taps named, so a spec can cut there.

The model's ``forward`` returns its outputs first, then the tap tensors. The taps are exported as outputs
(that is how ``torch.onnx.export`` names a tensor) and then removed from the graph outputs again, keeping
their names: the ONNX model computes exactly what the original does, and ``at: stage1`` finds the tensor.

Uses the TorchScript exporter (``dynamo=False``) with ``dynamic_axes``: on this project's machines it is
several times faster than the dynamo exporter and keeps the names we give. torch is imported lazily.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eecompile.errors import GraphError

log = logging.getLogger(__name__)


def export_onnx(model: Any, example_inputs: Sequence[Any] | Any, path: str | Path, *, input_names: Sequence[str],
                output_names: Sequence[str] = ("logits",), exit_taps: Sequence[str] = (), dynamic_batch: bool = True,
                dynamic_axes: Mapping[str, Mapping[int, str]] | None = None, opset: int = 17,
                keep_taps_as_outputs: bool = False) -> Path:
    """Export ``model`` (eval mode) to ``path``; return the path.

    ``forward(*example_inputs)`` must return ``len(output_names) + len(exit_taps)`` tensors: the outputs,
    then the taps. Axis 0 of every input and output is the symbolic ``batch`` when ``dynamic_batch``;
    ``dynamic_axes`` adds more (e.g. ``{"input_ids": {1: "seq"}}``).
    """
    import onnx
    import torch

    path = Path(path)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if len(inputs) != len(input_names):
        raise GraphError(f"export: {len(inputs)} example inputs but {len(input_names)} input names")
    names = [*output_names, *exit_taps]
    if len(set(names)) != len(names) or set(names) & set(input_names):
        raise GraphError(f"export: output and tap names must be distinct from each other and the inputs: {names}")
    model.eval()
    with torch.no_grad():
        got = model(*inputs)
    got = got if isinstance(got, (tuple, list)) else (got,)
    if len(got) != len(names):
        raise GraphError(
            f"export: forward returned {len(got)} tensors but {len(output_names)} outputs + {len(exit_taps)} "
            f"taps were named ({names}); return the outputs first, then the taps"
        )
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        axes = {n: {0: "batch"} for n in [*input_names, *names]}
    for n, extra in (dynamic_axes or {}).items():
        axes.setdefault(n, {}).update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model, inputs, str(path), input_names=list(input_names), output_names=names,
                          dynamic_axes=axes or None, opset_version=opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    if not keep_taps_as_outputs and exit_taps:
        keep = [o for o in proto.graph.output if o.name not in set(exit_taps)]
        taps = {o.name: o for o in proto.graph.output if o.name in set(exit_taps)}
        missing = [t for t in exit_taps if t not in taps]
        if missing:
            raise GraphError(f"export: taps {missing} did not come out of the exporter as named outputs")
        del proto.graph.output[:]
        proto.graph.output.extend(keep)
        # keep the taps' types and shapes so the compiler sees them without re-running inference
        proto.graph.value_info.extend(taps.values())
        onnx.save(proto, str(path))
    onnx.checker.check_model(proto)
    log.info("exported %s (outputs %s, taps %s)", path, list(output_names), list(exit_taps))
    return path
