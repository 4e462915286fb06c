"""LGViT (Xu et al. 2023): early exits on a Vision Transformer with heterogeneous exit heads: *local perception*
heads (the patch tokens laid back on their 2-D grid, a depthwise convolution, pooling) at shallow exits and
*global aggregation* heads (attention pooling over the tokens) at deep ones, trained by self-distillation from the
final exit with the backbone frozen.

The stand-in: images [B, 3, 16, 16] -> 4 x 4 patches (a stride-4 conv) -> 16 tokens + a class token, width 24 ->
four Transformer layers -> logits [B, 8] from the class token, trained for a few steps. Exits: ``local`` after
layer 1, ``global`` after layer 2, built in and trained by ``train-heads``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile

from .util import blob_images, check_compaction, export, fit_classifier, transformer_layer

pytestmark = pytest.mark.slow  # a ViT trained for a few steps, heads trained, calibrated: ~25 s

D, C = 24, 8


def layer_out(i: int) -> str:
    return f"/layers.{i}/ln2/LayerNormalization_output_0"


def make_vit(path: Path) -> Path:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, D, 4, stride=4)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
            self.pos = nn.Parameter(torch.randn(1, 17, D) * 0.02)
            self.layers = nn.ModuleList(transformer_layer(D, gelu=True) for _ in range(4))
            self.fc = nn.Linear(D, C)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            h = torch.cat([self.cls_token.expand(x.shape[0], 1, D), t], 1) + self.pos
            for layer in self.layers:
                h = layer(h)
            return self.fc(h[:, 0])

    model = fit_classifier(ViT(), blob_images, steps=120)
    return export(model, (torch.randn(2, 3, 16, 16),), path, ["x"], ["logits"])


def test_local_and_global_heads_on_a_vit(tmp_path: Path) -> None:
    from eecompile.calibrate import calibrate_bundle
    from eecompile.train import train_heads

    model = make_vit(tmp_path / "vit.onnx")
    exits = [{"at": layer_out(0), "head": {"kind": "local", "options": {"kernel": 3}},
              "gate": {"kind": "max_prob", "threshold": 0.9}},
             {"at": layer_out(1), "head": {"kind": "global"}, "gate": {"kind": "entropy", "threshold": 0.2}}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"model": str(model), "exits": exits}, sort_keys=False))
    path = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle").path
    assert [s.exit.head for s in eecompile.Bundle.load(path).manifest.segments[:-1]] == ["trained:local",
                                                                                        "trained:global"]
    x, y = blob_images(1000, seed=1)
    np.savez(tmp_path / "train.npz", x=x, labels=y)
    report = train_heads(path, tmp_path / "train.npz", epochs=20, quiet=True)
    for h in report.heads:  # distilled from the final exit: both heads learn to agree with it
        assert h.agree_before < 0.3 and h.agree_after > 0.6, h
    xc, yc = blob_images(900, seed=2)
    np.savez(tmp_path / "cal.npz", x=xc[:600], labels=yc[:600])
    cal = calibrate_bundle(path, tmp_path / "cal.npz", max_drop=0.1, costs=[1, 2, 4], quiet=True)
    assert cal.deployed, cal.summary_lines()
    res = eecompile.load(path).run({"x": xc[600:]})
    full = eecompile.load(path).run({"x": xc[600:]}, thresholds="never")
    assert (res.exit_index < 2).any()
    assert (full.outputs["logits"].argmax(1) == yc[600:]).mean() - (res.outputs["logits"].argmax(1) == yc[600:]).mean() <= 0.1
    never = eecompile.load(path).run({"x": xc[600:]}, thresholds="never", policy="never")
    thr = [float(np.quantile(never.gate_scores[0], 0.6)), float(np.quantile(never.gate_scores[1], 0.5))]
    check_compaction(eecompile.load(path), {"x": xc[600:]}, thr, "logits")
