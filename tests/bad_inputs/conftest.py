from __future__ import annotations

from pathlib import Path

import pytest

from tests.bad_inputs.util import copy_workspace, make_workspace


@pytest.fixture(scope="session")
def base_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("base") / "ws")


@pytest.fixture
def ws(base_workspace: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny workspace: model.onnx, head0/1.onnx, spec.yaml, data.npz, b.eebundle."""
    return copy_workspace(base_workspace, tmp_path / "ws")
