"""ONNX Runtime sessions on in-memory onnx-ir models, without holding the weights twice.

Small models are serialised in memory. Large ones (and anything near protobuf's 2 GB limit) are saved to a
temporary directory with external data and loaded from there: onnx-ir memory-maps external weights, so the only
full copy in memory is ONNX Runtime's own.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from eecompile.errors import GraphError

IN_MEMORY_LIMIT = 256 << 20  # bytes of initializers above which a model goes through a file


def initializer_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def session_from_model(model: ir.Model, extra_outputs: Sequence[ir.Value] = (), optimize: bool = True,
                       what: str = "the model") -> Any:
    """An InferenceSession on ``model`` with ``extra_outputs`` (typed values of its main graph) exposed."""
    import onnxruntime as ort

    from eecompile.runtimes.sessions import session_options

    so = session_options(0, optimization="all" if optimize else "disable")  # 0: ONNX Runtime's own thread count
    graph = model.graph
    saved_outputs = list(graph.outputs)
    present = set(saved_outputs)
    graph.outputs.extend(v for v in extra_outputs if v not in present and v.dtype is not None)
    try:
        folders = {str(t.base_dir) for v in graph.initializers.values()
                   if isinstance(t := v.const_value, ir.ExternalTensor)}
        if len(folders) == 1:
            # Weights already in an external file: the proto references them, ORT reads them from there.
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folders.pop())
        if not folders and initializer_bytes(model) <= IN_MEMORY_LIMIT:
            src: Any = ir.to_proto(model).SerializeToString()
            return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="eecompile-session-") as d:
            path = Path(d) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            # ORT reads the weights while the session is created; the files can go afterwards.
            return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except GraphError:
        raise
    except Exception as e:
        raise GraphError(f"ONNX Runtime cannot load {what}: {str(e).splitlines()[0]}") from e
    finally:
        graph.outputs.clear()
        graph.outputs.extend(saved_outputs)
