"""No model output is dropped without a word: an exit gives one value (the final output's), so every other
model output must be an exit head's output inside the model or be listed in ``final.drop``; a spec that
leaves one undefined is refused with one line naming them, and the dropped ones are noted in the bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.errors import SpecError

from .builders import yolo_detector
from .check import check_bundle

CUT = "/c1/c1.1/LeakyRelu_output_0"


def _spec(tmp: Path, model: Path, final: dict) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(yaml.safe_dump({"model": str(model), "final": final, "exits": [
        {"at": CUT, "head": {"output": "aux0"}, "gate": {"kind": "max_prob", "threshold": 0.6}}]}))
    return p


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    return yolo_detector(tmp_path_factory.mktemp("yolo") / "model.onnx")


def test_outputs_without_a_value_at_the_exits_are_refused(detector: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"outputs \['det_small', 'det_big'\] have no value at the exits.*"
                                        r"final: \{drop: \[det_small, det_big\]\}"):
        eecompile.compile_model(_spec(tmp_path, detector, {"output": "cls"}), tmp_path / "b.eebundle")
    with pytest.raises(SpecError, match="final.drop: \\['boxes'\\] are not model outputs"):
        eecompile.compile_model(_spec(tmp_path, detector, {"output": "cls", "drop": ["boxes"]}),
                                tmp_path / "b.eebundle")
    assert not (tmp_path / "b.eebundle").exists()


def test_detector_at_batch_1_with_dropped_outputs(detector: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, detector, {"output": "cls", "drop": ["det_small", "det_big"]})
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    assert any("['det_small', 'det_big'] are not in the bundle" in n for n in b.manifest.notes)
    assert [t.name for t in b.manifest.outputs] == ["cls"]
    feeds = {"images": np.random.default_rng(4).standard_normal((5, 3, 32, 32)).astype(np.float32)}
    check_bundle(detector, b.path, feeds, "cls", ["aux0"])
