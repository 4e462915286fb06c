"""Regression exits (an early-exit denoiser in the style of DeeDiff): a final output without a class axis
(predicted noise ``eps[B, 3, H, W]``), ``final.task: regression``; class gates on it are refused with the YAML
path, ``score`` and ``saturation`` gates compile and run with compaction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_spec

import eecompile
from eecompile.errors import SpecError
from eecompile.spec import parse_spec

B1, B2 = "/b1/Relu_output_0", "/b2/Relu_output_0"


def export_denoiser(path: Path) -> Path:
    """x[B, 3, 16, 16] -> three conv blocks (16 channels) -> eps[B, 3, 16, 16]; in-model exit heads: eps1 (a
    1x1 conv back to 3 channels after block 1) with an uncertainty score conf1[B, 1] (DeeDiff's UEM: a
    sigmoid of pooled features), and eps2 after block 2."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, 16, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b1, self.b2, self.b3 = Block(3), Block(16), Block(16)
            self.out1, self.out2, self.out = nn.Conv2d(16, 3, 1), nn.Conv2d(16, 3, 1), nn.Conv2d(16, 3, 1)
            self.uem = nn.Linear(16, 1)

        def forward(self, x):
            h1 = self.b1(x)
            h2 = self.b2(h1)
            conf1 = torch.sigmoid(self.uem(h1.mean((2, 3))) * 4)
            return self.out(self.b3(h2)), self.out1(h1), conf1, self.out2(h2)

    names = ["eps", "eps1", "conf1", "eps2"]
    torch.onnx.export(Denoiser().eval(), (torch.randn(2, 3, 16, 16),), str(path), input_names=["x"],
                      output_names=names, dynamic_axes={n: {0: "batch"} for n in ["x", *names]},
                      opset_version=17, dynamo=False)
    return path


def _exits(first: str = "score", second: str = "saturation") -> list[dict]:
    return [{"at": B1, "head": {"output": "eps1", "score_output": "conf1"}, "gate": {"kind": first, "threshold": 0.5}},
            {"at": B2, "head": {"output": "eps2"},
             "gate": {"kind": second, "threshold": 2 if second == "patience" else 0.5}}]


@pytest.mark.parametrize("kind", ["max_prob", "entropy", "margin", "patience"])
def test_class_gate_on_a_regression_output_is_refused(kind: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, tmp_path / "m.onnx", _exits(second=kind), {"output": "eps", "task": "regression"})
    with pytest.raises(SpecError, match=rf"exits\[1\]\.gate\.kind \(line \d+\): '{kind}' needs a class "
                                        r"axis .*, and final\.task is regression.*use score or saturation"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")


def test_unknown_task_and_class_axis_on_regression_are_refused() -> None:
    base = "model: m.onnx\nexits: [{at: t, head: {output: a}, gate: {kind: saturation, threshold: 0.5}}]\n"
    with pytest.raises(SpecError, match=r"final\.task \(line 3\): unknown task 'regresion'; one of "
                                        r"classification, regression"):
        parse_spec(base + "final: {task: regresion}\n")
    with pytest.raises(SpecError, match=r"final\.class_axis \(line 3\): a regression output has no class axis"):
        parse_spec(base + "final: {task: regression, class_axis: 1}\n")


def test_denoiser_with_score_and_saturation_exits(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = export_denoiser(tmp_path / "denoiser.onnx")
    spec = write_spec(tmp_path, model, _exits(), {"output": "eps", "task": "regression"})
    runner = eecompile.load(eecompile.compile_model(spec, tmp_path / "b.eebundle").path)
    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    eps, eps1, conf1, eps2 = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    never = runner.run({"x": x}, thresholds="never", policy="never")
    np.testing.assert_allclose(never.outputs["eps"], eps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(never.gate_scores[0], conf1[:, 0], rtol=1e-5)
    thr = [float(np.median(s)) for s in never.gate_scores]
    compact = runner.run({"x": x}, thresholds=thr, policy="compact")
    wait = runner.run({"x": x}, thresholds=thr, policy="wait-all")
    np.testing.assert_array_equal(compact.exit_index, wait.exit_index)
    assert len(set(compact.exit_index.tolist())) > 1, "median thresholds should split the batch"
    want = np.where((compact.exit_index == 0)[:, None, None, None], eps1,
                    np.where((compact.exit_index == 1)[:, None, None, None], eps2, eps))
    np.testing.assert_allclose(compact.outputs["eps"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(wait.outputs["eps"], want, rtol=1e-4, atol=1e-5)


def test_error_budget_calibration_holds_on_held_out_samples(tmp_path: Path) -> None:
    """calibrate with an error budget: per-sample relative L2 error to the final output <= eps counts as right,
    and the fraction over budget is what --max-drop bounds (search, Clopper-Pearson at 0.95)."""
    from eecompile.calibrate import calibrate_bundle, collect_exit_table

    model = export_denoiser(tmp_path / "denoiser.onnx")
    spec = write_spec(tmp_path, model, _exits(), {"output": "eps", "task": "regression"})
    path = eecompile.compile_model(spec, tmp_path / "b.eebundle").path
    rng = np.random.default_rng(0)
    # Inputs of varied scale, so an exit's relative error varies from sample to sample.
    x = (rng.standard_normal((1200, 3, 16, 16)) * rng.uniform(0.05, 3, (1200, 1, 1, 1))).astype(np.float32)
    cal, held = x[:800], x[800:]
    runner = eecompile.load(path)
    never = runner.run({"x": held}, thresholds="never", policy="never")
    final = never.outputs["eps"].reshape(len(held), -1)

    def rel(k: int) -> np.ndarray:
        y = never.all_exits[k]["eps"].reshape(len(held), -1)
        return np.linalg.norm(y - final, axis=1) / np.linalg.norm(final, axis=1)

    budget = float(np.quantile(rel(1), 0.6))  # about 60% of the samples are within budget at exit 1
    table = collect_exit_table(eecompile.Bundle.load(path), {"x": held}, None, error_budget=budget)
    np.testing.assert_array_equal(table.correct[1], rel(1) <= budget)
    np.testing.assert_array_equal(table.correct[0], rel(0) <= budget)
    assert table.correct[-1].all()
    np.savez(tmp_path / "cal.npz", x=cal)
    report = calibrate_bundle(path, tmp_path / "cal.npz", max_drop=0.2, error_budget=budget, costs=[1, 1, 1],
                              quiet=True)
    assert report.deployed, report
    res = eecompile.load(path).run({"x": held})
    assert (res.exit_index < 2).any(), "the calibrated thresholds let some samples exit early"
    out = res.outputs["eps"].reshape(len(held), -1)
    over = np.linalg.norm(out - final, axis=1) / np.linalg.norm(final, axis=1) > budget
    assert over.mean() <= 0.2, f"{over.mean():.3f} of held-out samples over the error budget"
