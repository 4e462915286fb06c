"""Helpers for the family tests: export a torch model, check the compaction invariant."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def export(module: Any, args: tuple, path: Path, inputs: Sequence[str], outputs: Sequence[str],
           opset: int = 17) -> Path:
    """``torch.onnx.export`` (TorchScript exporter) with a dynamic batch on every input and output."""
    import torch

    torch.onnx.export(module.eval(), args, str(path), input_names=list(inputs), output_names=list(outputs),
                      dynamic_axes={n: {0: "batch"} for n in [*inputs, *outputs]}, opset_version=opset, dynamo=False)
    return path


def check_compaction(runner: Any, feeds: dict[str, np.ndarray], thresholds: Sequence[Any], output: str,
                     rtol: float = 1e-4, atol: float = 1e-5) -> Any:
    """compact == wait-all == the rows of policy ``never`` at each sample's exit (forced per sample); returns
    the compact result. Asserts that the thresholds split the batch over more than one exit."""
    compact = runner.run(feeds, thresholds=list(thresholds), policy="compact")
    wait = runner.run(feeds, thresholds=list(thresholds), policy="wait-all")
    never = runner.run(feeds, thresholds=list(thresholds), policy="never")
    np.testing.assert_array_equal(compact.exit_index, wait.exit_index)
    np.testing.assert_array_equal(compact.exit_index, never.exit_index)
    assert len(set(compact.exit_index.tolist())) > 1, f"thresholds {thresholds} do not split the batch"
    want = np.stack([never.all_exits[k][output][i] for i, k in enumerate(compact.exit_index)])
    np.testing.assert_allclose(compact.outputs[output], want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(wait.outputs[output], want, rtol=rtol, atol=atol)
    return compact


def transformer_layer(width: int, gelu: bool = False, mlp_scale: float = 1.0) -> Any:
    """A post-norm Transformer layer (2-head self-attention, MLP of twice the width), batch first. Its output is
    its second LayerNorm's, exported as ``.../ln2/LayerNormalization_output_0``."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU() if gelu else nn.ReLU(),
                                     nn.Linear(2 * width, width))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            h = self.ln1(h + self.attn(h, h, h, need_weights=False)[0])
            return self.ln2(h + mlp_scale * self.mlp(h))

    return Layer()


def blob_images(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 3, size, size] of noise with one striped 6 x 6 patch at a random place; the label (0..7) is its
    colour (one of the three channels, or all of them) times its stripes' orientation (horizontal, vertical):
    local texture and colour, which pooled features of any depth can see."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, size, size)).astype(np.float32) * 0.5
    y = rng.integers(0, 8, n)
    stripes = (np.arange(6) % 2 * 2.0 - 1.0).astype(np.float32) * 1.5
    for i, c in enumerate(y):
        colour, vertical = c // 2, c % 2
        patch = np.tile(stripes, (6, 1)) if vertical else np.tile(stripes[:, None], (1, 6))
        r0, c0 = rng.integers(0, size - 6, 2)
        channels = [0, 1, 2] if colour == 3 else [colour]
        x[i, channels, r0:r0 + 6, c0:c0 + 6] += patch
    return x, y


def fit_classifier(model: Any, data: Any, steps: int, lr: float = 3e-3, batch: int = 64) -> Any:
    """A few Adam steps of cross-entropy on every logits output of ``model`` (a tuple or one tensor)."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = (torch.from_numpy(a) for a in data(batch, seed=1000 + step))
        outs = model(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum(torch.nn.functional.cross_entropy(o, y) for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
