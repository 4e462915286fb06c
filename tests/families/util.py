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
