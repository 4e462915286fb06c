"""Load an ONNX model into onnx-ir with clear errors, and normalise old-IR quirks.

Cases handled:
1. Missing, empty, truncated or non-ONNX files: one GraphError naming the file.
2. External data whose file is missing: GraphError naming the data file.
3. Old-IR models (IR < 4, e.g. the model-zoo graphs in the onnx package) that list every initializer
   among the graph inputs: those are not inputs, so they are removed from the input list.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveInitializersFromInputsPass, TopologicalSortPass

from eecompile.errors import GraphError

log = logging.getLogger(__name__)


def load_model(path: str | Path) -> ir.Model:
    """Read ``path`` as an onnx-ir model (external data memory-mapped) and normalise it."""
    path = Path(path)
    if not path.exists():
        raise GraphError(f"{path}: model file not found")
    if path.is_dir():
        raise GraphError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise GraphError(f"{path}: file is empty; export the model again")
    try:
        # Parse the protobuf first without external data: a clean message for non-ONNX files.
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise GraphError(f"{path}: not a valid ONNX model (cannot parse the protobuf: {type(e).__name__}); "
                         f"is the file truncated or of another format?") from e
    if not proto.graph.node:
        raise GraphError(f"{path}: the ONNX model has no nodes (empty or not a model file)")
    _check_external_data(proto, path)
    try:
        model = ir.load(path)
    except Exception as e:
        raise GraphError(f"{path}: onnx-ir cannot read the model ({e})") from e
    return normalise(model)


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import uses_external_data

    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if loc is None:
                raise GraphError(f"{path}: initializer '{tensor.name}' has external data without a location")
            data = path.parent / loc
            if not data.is_file():
                raise GraphError(
                    f"{path}: external data file '{loc}' for initializer '{tensor.name}' not found beside "
                    f"the model (looked at {data}); copy it next to the .onnx file"
                )


def normalise(model: ir.Model) -> ir.Model:
    """Old-IR fix (initializers are not inputs) and a topological order."""
    RemoveInitializersFromInputsPass()(model)
    # IR < 4 requires every initializer to be a graph input; with them removed, say IR 8.
    model.ir_version = max(model.ir_version, 8)
    TopologicalSortPass()(model)
    return model


def opset_of(model: ir.Model) -> int:
    """The model's ai.onnx opset (1 when it imports none)."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))
