"""Model-zoo graphs (IR 3, opset 9, the onnx package's test data) with exit heads written today (opset 17, the
first with LayerNormalization): the segments holding a head are raised to opset 17, the rest keep 9; compile's verify
passes; forced exits give the heads' rows (through the model's final Softmax where it has one); mixed
thresholds give the same rows under the compact and wait-all policies. (These graphs' weights are constants,
so every channel of a feature map is equal and a LayerNormalization head gives every sample the same score:
the second head, without one, is the one whose gate spreads the samples.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import zoo_model

import eecompile

from .builders import pooled_head, with_head_output
from .check import check_bundle, reference

# zoo model: ([(cut tensor, channels)], final class axis, final activation)
CASES = {
    "resnet50": ([("r35", 256), ("r99", 1024)], -1, "Softmax"),
    "densenet121": ([("r103", 256), ("r291", 512)], 1, None),
    "inception_v1": ([("r23", 256), ("r94", 528)], -1, "Softmax"),
}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_graph_with_opset17_layernorm_heads(name: str, tmp_path: Path) -> None:
    model = zoo_model(name)
    cuts, axis, act = CASES[name]
    g = onnx.load(str(model), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    feeds = {next(i.name for i in g.input if i.name not in inits): x}
    exits, ref = [], model
    for i, (t, c) in enumerate(cuts):
        head = pooled_head(tmp_path / f"h{i}.onnx", c, 1000, opset=17, layernorm=i == 0, seed=i, scale=1.0)
        if i == 1:  # scale the weights so the logits spread over a few units (softmax neither flat nor saturated)
            spread = reference(with_head_output(ref, head, t, "probe", tmp_path / "probe.onnx"), feeds)["probe"]
            head = pooled_head(head, c, 1000, opset=17, seed=i, scale=3.0 / float(np.std(spread, -1).mean()))
        exits.append({"at": t, "head": str(head), "gate": {"kind": ["max_prob", "margin"][i], "threshold": 0.5}})
        ref = with_head_output(ref, head, t, f"aux{i}", tmp_path / f"ref{i}.onnx")
    final = onnx.load(str(model), load_external_data=False).graph.output[0].name
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": str(model), "exits": exits,
                                    "final": {"output": final, "class_axis": axis}}))
    b = eecompile.compile_model(spec, tmp_path / "b.eebundle")
    opsets = [next(o.version for o in onnx.load(str(b.path / s.file), load_external_data=False).opset_import
                   if o.domain in ("", "ai.onnx")) for s in b.manifest.segments]
    assert opsets == [17, 17, 9]
    assert any("verified" in n for n in b.manifest.notes)
    transform = _softmax if act else None  # densenet ends in logits [N, 1000, 1, 1]
    check_bundle(ref, b.path, feeds, final, ["aux0", "aux1"], transform=transform, rtol=1e-3)
