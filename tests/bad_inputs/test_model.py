"""Bad model files: exit 1, one line naming the file and what to do, nothing written."""

from __future__ import annotations

from pathlib import Path

from eecompile.errors import GraphError, SpecError
from tests.bad_inputs.util import expect_error, spec_doc, tiny_mlp, write_yaml


def _compile_with_model(ws: Path, model: str) -> list:
    spec = write_yaml(ws / "bad.yaml", spec_doc(model=model))
    return ["compile", spec, "-o", ws / "out.eebundle"]


def test_truncated_model(ws: Path) -> None:
    data = (ws / "model.onnx").read_bytes()
    (ws / "cut.onnx").write_bytes(data[: len(data) // 2])
    expect_error(_compile_with_model(ws, "cut.onnx"), GraphError, "cut.onnx", "not a valid ONNX model",
                 "truncated", workspace=ws)


def test_model_that_is_not_onnx(ws: Path) -> None:
    (ws / "notes.onnx").write_text("this is a text file, not a model\n")
    expect_error(_compile_with_model(ws, "notes.onnx"), GraphError, "notes.onnx", "not a valid ONNX model",
                 workspace=ws)


def test_empty_model_file(ws: Path) -> None:
    (ws / "empty.onnx").write_bytes(b"")
    expect_error(_compile_with_model(ws, "empty.onnx"), GraphError, "empty.onnx", "empty", "export the model again",
                 workspace=ws)


def test_model_file_missing(ws: Path) -> None:
    expect_error(_compile_with_model(ws, "missing.onnx"), GraphError, "missing.onnx", "not found", workspace=ws)


def test_model_path_is_a_directory(ws: Path) -> None:
    (ws / "dir.onnx").mkdir()
    expect_error(_compile_with_model(ws, "dir.onnx"), (GraphError, SpecError), "dir.onnx", "directory",
                 workspace=ws)


def test_external_data_file_missing(ws: Path) -> None:
    tiny_mlp(ws / "ext.onnx", external=True)
    (ws / "ext.onnx.data").unlink()
    expect_error(_compile_with_model(ws, "ext.onnx"), GraphError, "ext.onnx", "external data file",
                 "ext.onnx.data", "copy it next to the .onnx file", workspace=ws)


def test_analyze_a_truncated_model(ws: Path) -> None:
    data = (ws / "model.onnx").read_bytes()
    (ws / "cut.onnx").write_bytes(data[:40])
    expect_error(["analyze", ws / "cut.onnx"], GraphError, "cut.onnx", "not a valid ONNX model", workspace=ws)
