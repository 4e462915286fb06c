"""DeeDiff (Tang et al. 2023): early exits inside a diffusion denoiser, each with an uncertainty estimation module
(UEM) that predicts the exit's error; a sample leaves where the predicted uncertainty is low.

The stand-in: a small time-conditioned conv denoiser (x_t [B, 3, 16, 16], t [B] -> predicted noise
eps [B, 3, 16, 16]; four residual blocks at full resolution, like the U-ViT blocks DeeDiff exits from), trained
for a few steps on noised smooth images. Exits are built-in ``conv`` heads that map the 32-channel features back
to the noise's 3 channels (1x1 convs; a head on a coarser map also upsamples: tests/test_heads.py), distilled
by ``train-heads`` with MSE to the final output; the first carries a UEM (``score: uncertainty``), the second a
``change`` gate on the output itself. Calibration uses an error budget (relative L2 error to the final output)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.errors import CalibrationError, SpecError

from .util import check_compaction, export

pytestmark = pytest.mark.slow  # a denoiser trained for a few steps, heads trained and calibrated: ~30 s

B1, B2 = "/b1/Add_output_0", "/b2/Add_output_0"


def make_denoiser(path: Path) -> Path:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)

    class Block(nn.Module):  # a residual conv block at full resolution (the U-ViT's blocks keep their tokens)
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(32, 32, 3, padding=1)

        def forward(self, x):
            return x + torch.relu(self.conv(x))

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.temb = nn.Linear(8, 32)
            self.stem = nn.Conv2d(3, 32, 3, padding=1)
            self.b1, self.b2, self.b3, self.b4 = Block(), Block(), Block(), Block()
            self.out = nn.Conv2d(32, 3, 1)

        def forward(self, x, t):
            freqs = torch.arange(4, dtype=torch.float32) + 1.0
            emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
            h = torch.relu(self.stem(x) + self.temb(emb)[:, :, None, None])
            return self.out(self.b4(self.b3(self.b2(self.b1(h)))))

    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):  # noise prediction on smooth images: enough for features that mean something
        x, t, eps = (torch.from_numpy(a) for a in noisy_batch(32, seed=100 + step, with_noise=True))
        loss = torch.nn.functional.mse_loss(model(x, t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return export(model, (torch.randn(2, 3, 16, 16), torch.rand(2)), path, ["x", "t"], ["eps"])


def noisy_batch(n: int, seed: int, with_noise: bool = False) -> tuple[np.ndarray, ...]:
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps for smooth x0 (upsampled 4 x 4 noise), a = cos(pi t / 2)^2."""
    rng = np.random.default_rng(seed)
    x0 = np.kron(rng.standard_normal((n, 3, 4, 4)), np.ones((1, 1, 4, 4)))
    t = rng.uniform(0.02, 0.98, n)
    a = np.cos(np.pi * t / 2)[:, None, None, None] ** 2
    eps = rng.standard_normal((n, 3, 16, 16))
    x = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    out = (x.astype(np.float32), t.astype(np.float32))
    return (*out, eps.astype(np.float32)) if with_noise else out


def spec(tmp: Path, model: Path, first: dict | None = None) -> Path:
    doc = {"model": str(model), "final": {"output": "eps", "task": "regression"}, "exits": [
        first or {"at": B1, "head": {"kind": "conv", "options": {"conv_channels": 24, "score": "uncertainty"}},
                  "gate": {"kind": "score", "threshold": 0.9}},
        {"at": B2, "head": {"kind": "conv", "options": {"conv_channels": 24}}, "gate": {"kind": "change", "threshold": 0.1}},
    ]}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp / "spec.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """The compiled bundle after train-heads, its directory and the training report."""
    from eecompile.train import train_heads

    tmp = tmp_path_factory.mktemp("deediff")
    model = make_denoiser(tmp / "denoiser.onnx")
    bundle = eecompile.compile_model(spec(tmp, model), tmp / "b.eebundle").path
    x, t = noisy_batch(600, seed=1)
    np.savez(tmp / "train.npz", x=x, t=t)
    report = train_heads(bundle, tmp / "train.npz", epochs=15, quiet=True)
    return bundle, tmp, report


def test_manifest_records_the_task_and_old_bundles_read_as_classification(trained) -> None:
    from eecompile.bundle import Manifest

    bundle, _, _ = trained
    m = eecompile.Bundle.load(bundle).manifest
    assert m.task == "regression"
    head = m.segments[0].exit.head_spec
    assert head["out_shape"] == [3, 16, 16] and head["trained"]
    d = m.to_dict()
    d.pop("task")  # a bundle written before the field
    assert Manifest.from_dict(d).task == "classification"
    from eecompile.inspect import describe_bundle

    assert describe_bundle(bundle)["task"] == "regression"


def test_train_heads_distils_regression_heads_and_the_uncertainty_module(trained) -> None:
    _, _, report = trained
    assert report.task == "regression"
    for h in report.heads:
        assert h.error_after < 0.7 * h.error_before, h  # MSE distillation brings the exit close to the final output
    uem = report.heads[0]
    assert uem.score == "uncertainty"
    assert uem.score_loss < 0.8 * uem.score_baseline, uem  # the UEM predicts its exit's error


def test_error_budget_calibration_and_mixed_thresholds(trained) -> None:
    from eecompile.calibrate import calibrate_bundle

    bundle, tmp, _ = trained
    runner = eecompile.load(bundle)
    x, t = noisy_batch(1400, seed=2)
    cal, held = {"x": x[:1000], "t": t[:1000]}, {"x": x[1000:], "t": t[1000:]}
    never = runner.run(held, thresholds="never", policy="never")
    final = never.outputs["eps"].reshape(len(held["x"]), -1)

    def rel(y: np.ndarray) -> np.ndarray:
        return np.linalg.norm(y.reshape(len(final), -1) - final, axis=1) / np.linalg.norm(final, axis=1)

    # The UEM's score (1 - predicted uncertainty) ranks samples by their exit's error.
    err0 = rel(never.all_exits[0]["eps"])
    assert np.corrcoef(never.gate_scores[0], err0)[0, 1] < -0.5
    budget = float(np.quantile(rel(never.all_exits[1]["eps"]), 0.7))
    np.savez(tmp / "cal.npz", **cal)
    with pytest.raises(CalibrationError, match=r"regression output \(final\.task: regression\).*--error-budget"):
        calibrate_bundle(bundle, tmp / "cal.npz", max_drop=0.2, costs=[1, 1, 1], quiet=True)
    report = calibrate_bundle(bundle, tmp / "cal.npz", max_drop=0.2, error_budget=budget, costs=[1, 1, 2],
                              quiet=True)
    assert report.deployed, report.summary_lines()
    assert report.reference == "error budget" and "error budget" in report.summary_lines()[0]
    res = eecompile.load(bundle).run(held)
    assert (res.exit_index < 2).mean() > 0.2, "the calibrated thresholds let samples exit early"
    assert (rel(res.outputs["eps"]) > budget).mean() <= 0.2, "held-out share over the error budget"
    # Mixed thresholds: the compaction invariant with both gates firing for some samples.
    thr = [float(np.quantile(never.gate_scores[0], 0.6)), float(np.quantile(never.gate_scores[1], 0.5))]
    check_compaction(eecompile.load(bundle), held, thr, "eps")


def test_learn_then_test_with_an_error_budget(trained) -> None:
    """LTT over the bounded 0/1 loss "over the error budget": certified, and held on held-out samples."""
    from eecompile.calibrate import calibrate_bundle

    bundle, tmp, _ = trained
    x, t = noisy_batch(1400, seed=5)
    np.savez(tmp / "cal_ltt.npz", x=x[:1000], t=t[:1000])
    held = {"x": x[1000:], "t": t[1000:]}
    final = eecompile.load(bundle).run(held, thresholds="never").outputs["eps"].reshape(400, -1)
    report = calibrate_bundle(bundle, tmp / "cal_ltt.npz", max_drop=0.2, error_budget=0.5, method="ltt",
                              costs=[1, 1, 2], quiet=True)
    assert report.deployed and report.certified, report.summary_lines()
    assert any("share over the error budget <= 0.2" in line for line in report.summary_lines())
    out = eecompile.load(bundle).run(held).outputs["eps"].reshape(400, -1)
    over = np.linalg.norm(out - final, axis=1) / np.linalg.norm(final, axis=1) > 0.5
    assert over.mean() <= 0.2


def test_cli_calibrate_reports_the_error_budget(trained) -> None:
    from click.testing import CliRunner

    from eecompile.cli import cli

    bundle, tmp, _ = trained
    x, t = noisy_batch(300, seed=3)
    np.savez(tmp / "cal_cli.npz", x=x, t=t)
    out = CliRunner().invoke(cli, ["calibrate", str(bundle), "--data", str(tmp / "cal_cli.npz"), "--max-drop", "0.3"])
    assert out.exit_code == 1 and "--error-budget" in out.output
    out = CliRunner().invoke(cli, ["calibrate", str(bundle), "--data", str(tmp / "cal_cli.npz"), "--max-drop", "0.5",
                                   "--error-budget", "0.5"])
    text = " ".join(out.output.split())
    assert out.exit_code == 0, text
    assert "error budget 0.5, max share over it 0.5" in text and "share within the error budget" in text, text
    assert "agreement" not in text, text
    from eecompile.device import main as device  # the runtime-only entry point takes the budget too

    assert device(["calibrate", str(bundle), "--data", str(tmp / "cal_cli.npz"), "--max-drop", "0.5",
                   "--error-budget", "0.5", "--repeats", "3"]) == 0


@pytest.mark.parametrize("options,task,match", [
    ({"score": "agreement"}, "regression", "score 'agreement' is for classification"),
    ({"score": "uncertainty"}, "classification", "score 'uncertainty' is for regression"),
])
def test_a_score_that_does_not_fit_the_task_is_refused(options: dict, task: str, match: str) -> None:
    from eecompile.spec import parse_spec

    doc = {"model": "m.onnx", "final": {"task": task}, "exits": [
        {"at": B1, "head": {"kind": "conv", "options": options}, "gate": {"kind": "score", "threshold": 0.5}}]}
    with pytest.raises(SpecError, match=match):
        parse_spec(yaml.safe_dump(doc))


def test_a_conv_head_on_a_coarser_map_upsamples_to_the_output(tmp_path: Path) -> None:
    """An exit at a stride-2 feature map ([B, 16, 8, 8]) of a U-Net-like denoiser: the conv head maps it back to
    eps [B, 3, 16, 16] (1x1 convs, bilinear upsampling), train-heads distils it, compaction holds."""
    torch = pytest.importorskip("torch")
    from eecompile.train import train_heads

    nn = torch.nn
    torch.manual_seed(0)

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.mid = nn.Conv2d(16, 16, 3, padding=1)
            self.out = nn.Conv2d(16, 3, 3, padding=1)

        def forward(self, x, t):
            h = torch.relu(self.down(x)) * (1 + t[:, None, None, None])
            h = torch.relu(self.mid(h)) + h
            return self.out(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="bilinear"))

    model = export(UNet(), (torch.randn(2, 3, 16, 16), torch.rand(2)), tmp_path / "unet.onnx", ["x", "t"], ["eps"])
    doc = {"model": str(model), "final": {"output": "eps", "task": "regression"}, "exits": [
        {"at": "/Mul_output_0", "head": {"kind": "conv", "options": {"conv_channels": 16}},
         "gate": {"kind": "change", "threshold": 0.1}},
        {"at": "/Add_1_output_0", "head": {"kind": "conv", "options": {"conv_channels": 16}},
         "gate": {"kind": "change", "threshold": 0.1}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    b = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle")
    assert b.manifest.segments[0].exit.head_spec["feature_shape"][2:] == [8, 8]
    x, t = noisy_batch(400, seed=1)
    np.savez(tmp_path / "train.npz", x=x, t=t)
    report = train_heads(b.path, tmp_path / "train.npz", epochs=15, quiet=True)
    for h in report.heads:
        assert h.error_after < 0.75 * h.error_before, h
    runner = eecompile.load(b.path)
    never = runner.run({"x": x[:64], "t": t[:64]}, thresholds="never", policy="never")
    assert never.all_exits[0]["eps"].shape == (64, 3, 16, 16)
    assert np.isinf(never.gate_scores[0]).all()  # the first change gate has nothing to compare with
    check_compaction(runner, {"x": x[:64], "t": t[:64]}, ["never", float(np.median(never.gate_scores[1]))], "eps")
