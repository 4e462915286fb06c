"""Dynamic Perceiver (Han et al. 2023): a CNN feature branch and a small set of latent tokens that read the CNN's
features by cross-attention after every stage; the exits classify from the latent tokens, so early exits cost
little. It deploys as published: the exits are the model's own heads (``head: {output: ...}``), and each cut
carries both branches (the CNN feature map and the latent tokens) to the next segment.

The stand-in: images [B, 3, 16, 16]; three CNN stages (16, 24, 32 channels); 4 latent tokens of width 32 updated
by cross-attention to each stage's (projected) features; exits logits1, logits2 after stages 1 and 2, the final
logits after stage 3 (mean latent token -> Linear), trained for a few steps on every exit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

import eecompile

from .util import blob_images, check_compaction, export, fit_classifier

pytestmark = pytest.mark.slow  # trained for a few steps, compiled, calibrated: ~15 s

L, D, C = 4, 32, 8


def make_perceiver(path: Path) -> tuple[Path, list[str]]:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)

    class Perceiver(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chans = [3, 16, 24, 32]
            self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2,
                                                                padding=1), nn.ReLU()) for i in range(3))
            self.proj = nn.ModuleList(nn.Linear(c, D) for c in chans[1:])
            self.cross = nn.ModuleList(nn.MultiheadAttention(D, 2, batch_first=True) for _ in range(3))
            self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(3))
            self.latent = nn.Parameter(torch.randn(1, L, D) * 0.1)
            self.heads = nn.ModuleList(nn.Linear(D, C) for _ in range(3))

        def forward(self, x):
            z, outs = self.latent.expand(x.shape[0], L, D), []
            for i, stage in enumerate(self.stages):
                x = stage(x)
                kv = self.proj[i](x.flatten(2).transpose(1, 2))
                z = self.norms[i](z + self.cross[i](z, kv, kv, need_weights=False)[0])
                outs.append(self.heads[i](z.mean(1)))
            return outs[2], outs[0], outs[1]

    model = fit_classifier(Perceiver(), blob_images, steps=100)
    export(model, (torch.randn(2, 3, 16, 16),), path, ["x"], ["logits", "logits1", "logits2"])
    latents = [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "LayerNormalization"]
    return path, latents


def test_exits_on_the_latent_branch_carry_both_branches(tmp_path: Path) -> None:
    import onnxruntime as ort

    from eecompile.calibrate import calibrate_bundle

    model, latents = make_perceiver(tmp_path / "perceiver.onnx")
    exits = [{"at": latents[i], "head": {"output": f"logits{i + 1}"}, "gate": {"kind": "max_prob", "threshold": 0.9}}
             for i in range(2)]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(
        {"model": str(model), "exits": exits, "final": {"output": "logits"}}, sort_keys=False))
    b = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle")
    carried = [sorted(s.carried_out) for s in b.manifest.segments[:-1]]
    assert all(len(c) >= 2 for c in carried), carried  # the feature map and the latent tokens
    xc, yc = blob_images(900, seed=2)
    logits, l1, l2 = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": xc[:64]})
    never = eecompile.load(b.path).run({"x": xc[:64]}, thresholds="never", policy="never")
    for k, want in enumerate((l1, l2, logits)):
        np.testing.assert_allclose(never.all_exits[k]["logits"], want, rtol=1e-4, atol=1e-5)
    np.savez(tmp_path / "cal.npz", x=xc[:600], labels=yc[:600])
    cal = calibrate_bundle(b.path, tmp_path / "cal.npz", max_drop=0.1, costs=[1, 2, 3], quiet=True)
    assert cal.deployed, cal.summary_lines()
    held = eecompile.load(b.path).run({"x": xc[600:]})
    full = eecompile.load(b.path).run({"x": xc[600:]}, thresholds="never")
    assert (held.exit_index < 2).any()
    assert (full.outputs["logits"].argmax(1) == yc[600:]).mean() - (held.outputs["logits"].argmax(1) == yc[600:]).mean() <= 0.1
    never = eecompile.load(b.path).run({"x": xc[600:]}, thresholds="never", policy="never")
    thr = [float(np.quantile(never.gate_scores[k], 0.6)) for k in range(2)]
    check_compaction(eecompile.load(b.path), {"x": xc[600:]}, thr, "logits")
