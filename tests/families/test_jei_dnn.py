"""JEI-DNN (Regol et al. 2024) and BERxiT's learning-to-exit (Xin et al. 2021): each exit has an inference head and
a *learned gate*, a small network that reads the exit's features and its softmax statistics and predicts whether
the exit's answer can be trusted; the sample leaves where that prediction is high.

The stand-in: a four-stage CNN classifier (images [B, 3, 16, 16] -> logits [B, 8]) trained for a few steps. Exits
after stages 1 and 2 are built-in ``mlp`` heads with ``score: agreement`` (a sigmoid over the pooled features,
max probability, normalised entropy and top-1 - top-2 margin), trained by ``train-heads`` to predict agreement with
the final exit; ``score`` gates read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile

from .util import blob_images, check_compaction, export, fit_classifier

pytestmark = pytest.mark.slow  # a CNN trained for a few steps, heads and gates trained, calibrated: ~20 s


def stage_out(i: int) -> str:
    return f"/stages.{i}/stages.{i}.1/Relu_output_0"


def make_cnn(path: Path) -> Path:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)

    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList([stage(3, 16, 1), stage(16, 24, 2), stage(24, 32, 2), stage(32, 32, 1)])
            self.fc = nn.Linear(32, 8)

        def forward(self, x):
            for s in self.stages:
                x = s(x)
            return self.fc(x.mean((2, 3)))

    return export(fit_classifier(CNN(), blob_images, steps=100), (torch.randn(2, 3, 16, 16),), path, ["x"],
                  ["logits"])


def test_learned_gates_predict_agreement_and_decide(tmp_path: Path) -> None:
    from eecompile.calibrate import calibrate_bundle
    from eecompile.train import train_heads

    model = make_cnn(tmp_path / "cnn.onnx")
    exits = [{"at": stage_out(i), "head": {"kind": "mlp", "options": {"hidden": 32, "score": "agreement"}},
              "gate": {"kind": "score", "threshold": 0.8}} for i in (0, 1)]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"model": str(model), "exits": exits}, sort_keys=False))
    path = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle").path
    x, y = blob_images(1200, seed=1)
    np.savez(tmp_path / "train.npz", x=x, labels=y)
    report = train_heads(path, tmp_path / "train.npz", epochs=20, quiet=True)
    first, second = report.heads
    assert 0.5 < first.agree_after < 0.95, first  # the shallow exit agrees often, not always: its gate has work
    assert first.score == "agreement" and first.score_loss < 0.95 * first.score_baseline, first
    assert second.agree_after > 0.95 and second.score_loss < second.score_baseline + 0.01, second
    xc, yc = blob_images(1000, seed=2)
    runner = eecompile.load(path)
    never = runner.run({"x": xc}, thresholds="never", policy="never")
    final = never.outputs["logits"].argmax(1)
    # The learned gate ranks samples by whether the (shallow) exit agrees with the final exit.
    agree = never.all_exits[0]["logits"].argmax(1) == final
    s = never.gate_scores[0]
    assert s[agree].mean() > s[~agree].mean() + 0.1, (s[agree].mean(), s[~agree].mean())
    np.savez(tmp_path / "cal.npz", x=xc[:700])
    cal = calibrate_bundle(path, tmp_path / "cal.npz", max_drop=0.1, costs=[1, 2, 4], quiet=True)
    assert cal.deployed, cal.summary_lines()
    held = eecompile.load(path).run({"x": xc[700:]})
    assert (held.exit_index < 2).any()
    assert (held.outputs["logits"].argmax(1) != final[700:]).mean() <= 0.1
    thr = [float(np.quantile(never.gate_scores[k], 0.6)) for k in range(2)]
    check_compaction(eecompile.load(path), {"x": xc[:128]}, thr, "logits")
