"""A CIFAR-size early-exit ResNet (He et al. 2016, the 6n+2 family) with named exit taps.

``forward`` returns ``(logits, *taps)``: the final logits, then the tensor at each tap (the output of a stage
by default). :func:`eecompile.models.export.export_onnx` gives those tensors the tap names in the ONNX graph,
so a spec can cut there (``at: stage1``) and let eecompile train a head on it (``head: {kind: linear}``).
With ``internal_heads=True`` the model also carries its own exit heads (pool + linear) and returns their
logits after the taps (``exit{i}_logits``), for specs that use ``head: {output: exit0_logits}``.

torch is required (the ``train`` extra); this module is imported only by code that already uses torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class EarlyExitResNet(nn.Module):
    """ResNet for 32x32 images: stem, three stages (widths ``widths``, ``blocks`` blocks each), pool, linear.

    Taps (``exit_taps``) are the outputs of the first ``len(widths) - 1`` stages, named ``stage1``, ``stage2``...
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (3, 3, 3),
                 in_channels: int = 3, internal_heads: bool = False) -> None:
        super().__init__()
        if len(widths) != len(blocks) or len(widths) < 2:
            raise ValueError("widths and blocks need one entry per stage, and at least two stages")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        stages = []
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = [BasicBlock(c, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            c = w
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(c, num_classes)
        self.exit_taps = tuple(f"stage{i + 1}" for i in range(len(widths) - 1))
        self.heads = nn.ModuleList([nn.Linear(w, num_classes) for w in widths[:-1]]) if internal_heads else None

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of what ``forward`` returns after the taps (the final logits first)."""
        extra = tuple(f"exit{i}_logits" for i in range(len(self.exit_taps))) if self.heads is not None else ()
        return ("logits", *extra)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.stem(x)
        taps = []
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.stages) - 1:
                taps.append(h)
        logits = self.fc(h.mean(dim=(2, 3)))
        heads = [head(t.mean(dim=(2, 3))) for head, t in zip(self.heads, taps, strict=True)] if self.heads is not None else []
        return (logits, *heads, *taps)
