"""Quickstart: a PyTorch CNN that already has its exit heads, exported to ONNX and compiled into a bundle.

The heads live inside the model (extra outputs ``exit0_logits``, ``exit1_logits``); the spec points each exit
at the tensor the head reads and at the head's output (``head: {output: exit0_logits}``). eecompile cuts the
graph there, adds the gates, and the runtime drops the samples that exited.

Run: .venv/bin/python examples/quickstart/quickstart.py   (writes examples/quickstart/out/)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import eecompile
from eecompile.models.export import export_onnx

OUT = Path(__file__).resolve().parent / "out"

SPEC = """\
model: cnn.onnx
exits:
  - at: block1              # the tensor exit 0's head reads (named by the export helper)
    head: {output: exit0_logits}
    gate: {kind: max_prob, threshold: 0.9}
  - at: block2
    head: {output: exit1_logits}
    gate: {kind: entropy, threshold: 0.3}
final: {output: logits}
"""


class TinyCNN(nn.Module):
    """Three conv blocks on 32x32 RGB; a pool + linear head after blocks 1 and 2, and the classifier."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head0 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_classes))
        self.head1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, n_classes))
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b1 = self.block1(x)
        b2 = self.block2(b1)
        # outputs first (final, then the exit heads), then the taps to name
        return self.fc(self.block3(b2)), self.head0(b1), self.head1(b2), b1, b2


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = TinyCNN().eval()
    export_onnx(model, (torch.randn(2, 3, 32, 32),), OUT / "cnn.onnx", input_names=["input"],
                output_names=["logits", "exit0_logits", "exit1_logits"], exit_taps=["block1", "block2"])
    (OUT / "spec.yaml").write_text(SPEC)
    bundle = eecompile.compile_model(OUT / "spec.yaml", OUT / "cnn.eebundle", force=True)
    print(f"compiled: {len(bundle.manifest.segments)} segments, thresholds {bundle.manifest.thresholds}")

    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    runner = eecompile.load(OUT / "cnn.eebundle")
    # An untrained model is never confident: loosen the gates to see samples leave early.
    for thresholds in (None, [0.11, 0.999]):
        res = runner.run({"input": x}, thresholds=thresholds)
        print(f"thresholds {thresholds or 'from the bundle'}: exit counts {res.exit_counts.tolist()}, "
              f"logits {res.outputs['logits'].shape}")
    full = runner.run({"input": x}, thresholds="never").outputs["logits"]
    print(f"no exit == the original model's logits: max |diff| {np.abs(full - model(torch.from_numpy(x))[0].detach().numpy()).max():.2e}")


if __name__ == "__main__":
    main()
