"""Loading: one GraphError naming the file for each way a model file can be bad; old-IR models lose the
initializers they list among their inputs."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from eecompile.errors import GraphError
from eecompile.passes.load import load_model

OLD_IR = """
<ir_version: 3, opset_import: ["" : 9]>
g (float[1, 2] x, float[2, 2] w) => (float[1, 2] y) <float[2, 2] w = {1, 2, 3, 4}> {
    y = MatMul(x, w)
}
"""


def test_old_ir_initializers_are_not_inputs(tmp_path: Path) -> None:
    path = tmp_path / "old.onnx"
    onnx.save(onnx.parser.parse_model(OLD_IR), path)
    model = load_model(path)
    assert [v.name for v in model.graph.inputs] == ["x"]  # Before: [x, w]
    assert list(model.graph.initializers) == ["w"] and model.ir_version >= 8
    onnx.checker.check_model(ir.to_proto(model))


@pytest.mark.parametrize("content, message", [
    (None, "model file not found"),
    (b"", "file is empty; export the model again"),
    (b"\xff\xfe not a protobuf \x00\x01" * 8, "not a valid ONNX model .*is the file truncated or of another format"),
])
def test_bad_files_are_one_clear_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(GraphError, match=rf"m\.onnx: {message}"):
        load_model(path)


def test_directory_and_empty_graph_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GraphError, match="is a directory, expected an .onnx file"):
        load_model(tmp_path)
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    onnx.save(empty, tmp_path / "e.onnx")
    with pytest.raises(GraphError, match="the ONNX model has no nodes"):
        load_model(tmp_path / "e.onnx")
