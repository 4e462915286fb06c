"""Exit heads trained on frozen features: they learn the final exit, with or without labels, and the
rewritten bundle still verifies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import eecompile  # noqa: E402
from eecompile.bundle import Bundle  # noqa: E402
from eecompile.errors import BundleError, EECompileError  # noqa: E402

N_CLASSES = 4


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four well-separated Gaussian clusters in 16-d: easy already at the first layer."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(0, 3.0, size=(N_CLASSES, 16))
    y = rng.integers(0, N_CLASSES, size=n)
    x = centers[y] + rng.normal(0, 1.0, size=(n, 16))
    return x.astype(np.float32), y.astype(np.int64)


def make_model_onnx(path: Path) -> Path:
    """A 3-layer MLP trained on the blobs, exported with taps h1 and h2."""
    from eecompile.models.export import export_onnx

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(16, 32)
            self.l2 = torch.nn.Linear(32, 32)
            self.l3 = torch.nn.Linear(32, N_CLASSES)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h1 = torch.relu(self.l1(x))
            h2 = torch.relu(self.l2(h1))
            return self.l3(h2), h1, h2

    torch.manual_seed(0)
    net = Net()
    x, y = blobs(512, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x))[0], torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return export_onnx(net.eval(), (torch.from_numpy(x[:2]),), path, input_names=["x"], exit_taps=("h1", "h2"))


def make_bundle(tmp: Path, heads: tuple[str, str] = ("{kind: linear}", "{kind: mlp, options: {hidden: 16}}"),
                gates: tuple[str, str] = ("max_prob", "max_prob"), thresholds: tuple[float, float] = (0.9, 0.9)) -> Path:
    """Compile the blob MLP with two exits (at h1, h2) into ``tmp/model.eebundle``."""
    make_model_onnx(tmp / "model.onnx")
    exits = "".join(f"  - at: h{i + 1}\n    head: {heads[i]}\n    gate: {{kind: {gates[i]}, threshold: {thresholds[i]}}}\n"
                    for i in range(2))
    (tmp / "spec.yaml").write_text(f"model: model.onnx\nexits:\n{exits}final: {{output: logits}}\n")
    eecompile.compile_model(tmp / "spec.yaml", tmp / "model.eebundle")
    return tmp / "model.eebundle"


def save_data(path: Path, n: int, seed: int, labels: bool = True) -> Path:
    x, y = blobs(n, seed)
    if labels:
        np.savez(path, x=x, labels=y)
    else:
        np.savez(path, x=x)
    return path


@pytest.mark.parametrize("labels", [True, False])
def test_trained_heads_reach_the_final_exits_agreement(tmp_path: Path, labels: bool) -> None:
    from eecompile.train import train_heads

    bundle = make_bundle(tmp_path)
    before = Bundle.load(bundle)
    assert all(s.exit.head_spec and not s.exit.head_spec.get("trained") for s in before.manifest.segments[:-1])
    report = train_heads(bundle, save_data(tmp_path / "train.npz", 600, seed=2, labels=labels), epochs=15,
                         quiet=True)
    assert report.used_labels is labels
    assert [h.index for h in report.heads] == [0, 1]
    for h in report.heads:
        assert h.agree_before < 0.5 and h.agree_after >= 0.95

    # The rewritten bundle verifies (hashes), records the training, and its exits agree on held-out data.
    b = Bundle.load(bundle, verify=True)
    assert all(s.exit.head_spec and s.exit.head_spec["trained"] for s in b.manifest.segments[:-1])
    x, _ = blobs(300, seed=3)
    runner = eecompile.load(b)
    final = runner.run({"x": x}, thresholds="never").outputs["logits"].argmax(1)
    for k in range(2):
        forced: list[float | str] = ["never", "never"]
        forced[k] = "always"
        exit_k = runner.run({"x": x}, thresholds=forced).outputs["logits"].argmax(1)
        assert (exit_k == final).mean() >= 0.95


def test_untrained_heads_never_fire(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, thresholds=(0.3, 0.3))
    x, _ = blobs(64, seed=4)
    res = eecompile.load(bundle).run({"x": x})
    assert res.exit_counts.tolist() == [0, 0, 64]  # uniform softmax: max_prob = 1/4 < 0.3


def test_no_trainable_head_is_a_clear_error(tmp_path: Path) -> None:
    import onnx

    from eecompile.heads import head_onnx

    onnx.save(head_onnx("linear", [None, 32], N_CLASSES), tmp_path / "h.onnx")
    bundle = make_bundle(tmp_path, heads=("h.onnx", "h.onnx"))
    from eecompile.train import train_heads

    with pytest.raises(BundleError, match="no exit has a head to train"):
        train_heads(bundle, save_data(tmp_path / "d.npz", 50, seed=0), epochs=1, quiet=True, head_files=False)


def test_halting_options_on_a_bundle_without_halting_heads_are_refused(tmp_path: Path) -> None:
    """--halting-beta/--halting-prior only shape PALBERT's lambdas: on a bundle without a ``score: halting`` head
    they used to be ignored without a word; now they are refused (the defaults, not given, still train)."""
    from click.testing import CliRunner

    from eecompile.cli import cli

    bundle = make_bundle(tmp_path)
    data = save_data(tmp_path / "d.npz", 50, seed=0)
    before = (bundle / "manifest.yaml").read_text()
    r = CliRunner().invoke(cli, ["train-heads", str(bundle), "--data", str(data), "--epochs", "1",
                                 "--halting-beta", "0.3"])
    assert r.exit_code == 1 and r.output.strip() == (
        f"error: train-heads --halting-beta 0.3: only for halting heads (PALBERT's lambda: an exit `head: {{kind: "
        f"linear, options: {{score: halting}}}}` on a q_exit gate); {bundle} has none, so nothing would use it: "
        f"leave it out"), r.output
    from eecompile.train import train_heads

    with pytest.raises(EECompileError, match=r"^train-heads --halting-beta 0\.2 and --halting-prior 0\.4: only for "
                                             r"halting heads .*leave them out$"):
        train_heads(bundle, data, epochs=1, quiet=True, halting_beta=0.2, halting_prior=0.4)
    assert (bundle / "manifest.yaml").read_text() == before
    r = CliRunner().invoke(cli, ["train-heads", str(bundle), "--data", str(data), "--epochs", "1"])
    assert r.exit_code == 0, r.output


def test_head_files_are_trained_in_place(tmp_path: Path) -> None:
    """Heads given as ONNX files: their weights are trained (the graph run in torch), the file's nodes kept."""
    import onnx

    from eecompile.heads import head_onnx
    from eecompile.train import train_heads

    onnx.save(head_onnx("mlp", [None, 32], N_CLASSES, {"hidden": 16}), tmp_path / "h.onnx")
    bundle = make_bundle(tmp_path, heads=("h.onnx", "h.onnx"))
    report = train_heads(bundle, save_data(tmp_path / "d.npz", 600, seed=2), epochs=15, quiet=True)
    assert [h.kind for h in report.heads] == ["file", "file"]
    for h in report.heads:
        assert h.agree_before < 0.6 and h.agree_after > 0.9, h
    b = eecompile.Bundle.load(bundle)
    trained = onnx.load(str(b.verify_file("heads/exit0.onnx")))
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in onnx.load(str(tmp_path / "h.onnx")).graph.node]
    assert b.manifest.segments[0].exit.head_spec["trained"] and not any("untrained" in n for n in b.manifest.notes)
    x, _ = blobs(200, seed=5)
    runner = eecompile.load(bundle)
    final = runner.run({"x": x}, thresholds="never").outputs["logits"].argmax(1)
    forced = runner.run({"x": x}, thresholds=["always", "never"]).outputs["logits"].argmax(1)
    assert (forced == final).mean() > 0.9


def test_a_head_file_with_a_score_output_keeps_feeding_its_gate(tmp_path: Path) -> None:
    """A head file with two outputs (logits and a score the gate reads): train-heads trains the logits, and the
    gate reads the trained file's score output afterwards (the old head's score is replaced, not left dangling)."""
    import onnx
    import onnxruntime as ort

    from eecompile.heads import head_module, head_onnx, module_weights
    from eecompile.runtimes.chain import EarlyExitRunner
    from eecompile.train import train_heads

    module = head_module("linear", [None, 32], N_CLASSES, {"score": "agreement"})
    with torch.no_grad():
        module.score_layer.weight.normal_(0, 0.3)
        module.score_layer.bias.zero_()
    onnx.save(head_onnx("linear", [None, 32], N_CLASSES, {"score": "agreement"}, weights=module_weights(module)),
              tmp_path / "hs.onnx")
    bundle = make_bundle(tmp_path, heads=("{file: hs.onnx, score_output: score}", "{kind: linear}"),
                         gates=("score", "max_prob"), thresholds=(0.5, 0.9))
    report = train_heads(bundle, save_data(tmp_path / "d.npz", 600, seed=2), epochs=10, quiet=True)
    assert report.heads[0].kind == "file" and report.heads[0].agree_after > 0.9
    b = Bundle.load(bundle)
    x, _ = blobs(50, seed=6)
    runner = EarlyExitRunner(b, expose={0: ["h1"]})
    res = runner.run({"x": x}, thresholds="never", policy="never", extra_outputs={0: ["h1"]})
    head = ort.InferenceSession(str(b.verify_file("heads/exit0.onnx")), providers=["CPUExecutionProvider"])
    logits, score = head.run(None, {"features": res.extra[0]["h1"]})
    np.testing.assert_allclose(res.gate_scores[0], score[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.all_exits[0]["logits"], logits, rtol=1e-5, atol=1e-5)
    runner.close()


def test_the_report_speaks_of_regression_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from eecompile.train import HeadResult, TrainReport

    r = TrainReport(bundle="b", n_train=9, n_val=1, epochs=1, temperature=2.0, used_labels=False, final_accuracy=None,
                    task="regression",
                    heads=[HeadResult(0, None, "conv", None, None, None, None, None, 0.1, error_before=1.0,
                                      error_after=0.2, score="uncertainty", score_loss=0.01, score_baseline=0.05)])
    r.print()
    out = " ".join(capsys.readouterr().out.split())
    assert "MSE to the final output" in out and "rel. L2 error" in out and "agreement" not in out


def test_small_data_reports_no_held_out_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Below 20 samples none is held out: the held-out columns are '-', not figures of the training rows (or of
    no rows at all), and nothing warns about a mean of an empty slice."""
    import warnings

    from eecompile.train import train_heads

    bundle = make_bundle(tmp_path, heads=("{kind: linear, options: {score: agreement}}", "{kind: linear}"),
                         gates=("score", "max_prob"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = train_heads(bundle, save_data(tmp_path / "d.npz", 12, seed=2), epochs=2, quiet=True)
    assert report.n_val == 0 and report.n_train == 12 and report.final_accuracy is None
    for h in report.heads:
        assert (h.agree_before, h.agree_after, h.acc_before, h.acc_after) == (None, None, None, None), h
        assert h.train_agree is not None and 0.0 <= h.train_agree <= 1.0
    assert report.heads[0].score == "agreement" and report.heads[0].score_loss is None
    specs = [s.exit.head_spec or {} for s in Bundle.load(bundle).manifest.segments[:-1]]
    assert all(s["trained"] and "held_out_agreement" not in s and "held_out_score_loss" not in s for s in specs)
    report.print()
    out = " ".join(capsys.readouterr().out.split())
    assert "no held-out samples" in out and "no samples were held out" in out and "held-out): " not in out

    # Holding out every sample leaves nothing to train on: one clear error, not heads fitted to nothing.
    with pytest.raises(EECompileError, match="val_fraction 0.99 holds out all 40 samples"):
        train_heads(bundle, save_data(tmp_path / "e.npz", 40, seed=2), epochs=1, quiet=True, val_fraction=0.99)


def test_train_heads_on_a_loop_bundle_trains_one_steps_chain(tmp_path: Path) -> None:
    """A loop spec with a trained head compiled into a bundle whose heads could not be trained: train-heads ran the
    chain through the segment runner, which refuses loop bundles. The heads train on one step's chain, the data
    holding its inputs, the per-step ones included; the bundle keeps its loop."""
    import yaml

    from eecompile.train import train_heads
    from tests.loops.models import export_shift

    model = export_shift(tmp_path / "shift.onnx")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "model": str(model), "final": {"output": "y", "task": "regression"},
        "exits": [{"at": "h", "head": {"kind": "linear"}, "gate": {"kind": "change", "threshold": 0.1}}],
        "loop": {"steps": 3, "feedback": {"y": "x"}, "inputs": {"t": {"source": "linspace", "start": 1.0, "end": 0.0}}}}))
    bundle = eecompile.compile_model(tmp_path / "s.yaml", tmp_path / "s.eebundle", engines=False).path
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.normal(size=(64, 4)).astype(np.float32),
             t=rng.uniform(0, 1, 64).astype(np.float32))
    report = train_heads(bundle, tmp_path / "train.npz", epochs=30, seed=0)
    first = report.heads[0]
    assert first.error_after is not None and first.error_before is not None, first
    assert first.error_after < first.error_before, first
    loaded = Bundle.load(bundle)
    assert loaded.manifest.loop is not None and loaded.manifest.loop["steps"] == 3
    res = eecompile.load(bundle).run({"x": np.ones((2, 4), np.float32)}, steps=2)
    assert res.steps.tolist() == [2, 2]
