"""PALBERT (Balagansky and Gavrilov 2022): an ALBERT (one layer's weights shared across depth) whose exits each give
class logits and a halting probability lambda_i; the Q-exit rule leaves at the first exit where the probability of
having halted, 1 - prod_{j<=i} (1 - lambda_j), reaches one shared threshold q.

The stand-in: tokens x [B, 8, 16] -> Linear to 32 -> the same Transformer-style layer (self-attention + MLP,
LayerNorm) six times -> logits [B, 4] from the first token; after layers 2 and 4 an in-model exit: logits_i and
lambda_i = sigmoid(w . h_i[:, 0]), trained for a few steps (cross-entropy at every exit, lambda fitted to whether
the exit is right)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

import eecompile
from eecompile.errors import SpecError

from .util import check_compaction, export, transformer_layer

pytestmark = pytest.mark.slow  # a small ALBERT trained for a few steps, compiled four times: ~35 s

T, F, D, C = 8, 16, 32, 4


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, T, F)).astype(np.float32)
    w = np.random.default_rng(7).standard_normal((F, C))
    return x, np.argmax(x.mean(1) @ w + 0.3 * rng.standard_normal((n, C)), 1)


def make_palbert(path: Path) -> tuple[Path, list[str]]:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)

    class PALBERT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.layer = nn.Linear(F, D), transformer_layer(D)
            self.cls = nn.ModuleList(nn.Linear(D, C) for _ in range(3))
            self.lam = nn.ModuleList(nn.Linear(D, 1) for _ in range(2))

        def forward(self, x):
            h, outs = self.emb(x), []
            for i in range(6):
                h = self.layer(h)
                if i in (1, 3):
                    j = len(outs) // 2
                    outs += [self.cls[j](h[:, 0]), torch.sigmoid(self.lam[j](h[:, 0]))]
            return (self.cls[2](h[:, 0]), *outs)

    model = PALBERT()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(80):
        x, y = (torch.from_numpy(a) for a in data(64, seed=100 + step))
        logits, l1, lam1, l2, lam2 = model(x)
        loss = sum(nn.functional.cross_entropy(z, y) for z in (logits, l1, l2))
        for z, lam in ((l1, lam1), (l2, lam2)):  # lambda: the chance this exit is right
            loss = loss + nn.functional.binary_cross_entropy(lam[:, 0], (z.argmax(1) == y).float().detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = ["logits", "logits1", "lam1", "logits2", "lam2"]
    export(model, (torch.randn(2, T, F),), path, ["x"], names)
    lns = [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "LayerNormalization"]
    return path, lns[1::2]  # each layer's output: its second LayerNorm


@pytest.fixture(scope="module")
def palbert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    tmp = tmp_path_factory.mktemp("palbert")
    model, layers = make_palbert(tmp / "palbert.onnx")
    return model, layers, tmp


def q_spec(tmp: Path, model: Path, layers: list[str], first: str = "q_exit", name: str = "spec.yaml") -> Path:
    exits = [{"at": layers[1], "head": {"output": "logits1", "score_output": "lam1"},
              "gate": {"kind": first, "threshold": 0.5}},
             {"at": layers[3], "head": {"output": "logits2", "score_output": "lam2"},
              "gate": {"kind": "q_exit", "threshold": 0.5}}]
    doc = {"model": str(model), "exits": exits, "final": {"output": "logits"}}
    (tmp / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp / name


def test_q_exit_gate_is_the_cumulative_halting_probability(palbert) -> None:
    import onnxruntime as ort

    model, layers, tmp = palbert
    b = eecompile.compile_model(q_spec(tmp, model, layers), tmp / "q.eebundle")
    runner = eecompile.load(b.path)
    x, _ = data(64, seed=1)
    logits, _, lam1, _, lam2 = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    never = runner.run({"x": x}, thresholds="never", policy="never")
    np.testing.assert_allclose(never.outputs["logits"], logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(never.gate_scores[0], lam1[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(never.gate_scores[1], 1 - (1 - lam1[:, 0]) * (1 - lam2[:, 0]), rtol=1e-5, atol=1e-6)
    q = float(np.median(never.gate_scores[1]))
    res = check_compaction(runner, {"x": x}, [q, q], "logits")
    want = np.where(lam1[:, 0] >= q, 0, np.where(1 - (1 - lam1[:, 0]) * (1 - lam2[:, 0]) >= q, 1, 2))
    np.testing.assert_array_equal(res.exit_index, want)


def test_calibrate_searches_one_shared_q(palbert) -> None:
    from eecompile.calibrate import calibrate_bundle

    model, layers, tmp = palbert
    path = eecompile.compile_model(q_spec(tmp, model, layers), tmp / "cal.eebundle").path
    x, y = data(900, seed=2)
    np.savez(tmp / "cal.npz", x=x[:600], labels=y[:600])
    report = calibrate_bundle(path, tmp / "cal.npz", max_drop=0.1, costs=[1, 1, 1], quiet=True)
    assert report.deployed, report.summary_lines()
    thr = eecompile.Bundle.load(path).manifest.thresholds
    assert thr[0] == thr[1] and np.isfinite(thr[0]), thr
    assert any("one threshold q, shared by all exits" in n for n in report.notes)
    held = eecompile.load(path).run({"x": x[600:]})
    assert (held.exit_index < 2).any()
    full = eecompile.load(path).run({"x": x[600:]}, thresholds="never")
    drop = (full.outputs["logits"].argmax(1) == y[600:]).mean() - (held.outputs["logits"].argmax(1) == y[600:]).mean()
    assert drop <= 0.1


def test_the_product_starts_at_the_first_q_exit_after_another_gate(palbert) -> None:
    model, layers, tmp = palbert
    b = eecompile.compile_model(q_spec(tmp, model, layers, first="max_prob", name="mixed.yaml"), tmp / "m.eebundle")
    x, _ = data(16, seed=3)
    never = eecompile.load(b.path).run({"x": x}, thresholds="never", policy="never")
    import onnxruntime as ort

    lam2 = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["lam2"], {"x": x})[0]
    np.testing.assert_allclose(never.gate_scores[1], lam2[:, 0], rtol=1e-5, atol=1e-6)


def test_q_exit_head_without_a_lambda_output_is_refused(palbert, tmp_path: Path) -> None:
    model, layers, _ = palbert
    exits = [{"at": layers[1], "head": {"output": "logits1"}, "gate": {"kind": "q_exit", "threshold": 0.5}}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"model": str(model), "exits": exits,
                                                     "final": {"output": "logits", "drop": ["lam1", "logits2", "lam2"]}}))
    with pytest.raises(SpecError, match=r"exits\[0\]\.head: gate kind 'q_exit' needs the head's halting probability "
                                        r"lambda \(a Q-exit head without a lambda output\)"):
        eecompile.compile_model(tmp_path / "s.yaml", tmp_path / "b.eebundle")


def test_a_halting_score_on_another_gate_is_refused(palbert, tmp_path: Path) -> None:
    model, layers, _ = palbert
    exits = [{"at": layers[1], "head": {"kind": "linear", "options": {"pool": "first", "score": "halting"}},
              "gate": {"kind": "max_prob", "threshold": 0.5}}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"model": str(model), "exits": exits, "final": {
        "output": "logits", "drop": ["logits1", "lam1", "logits2", "lam2"]}}))
    with pytest.raises(SpecError, match=r"exits\[0\]\.head\.options\.score.*: score 'halting' is PALBERT's halting "
                                        r"probability lambda, which a q_exit gate reads; this exit's gate is 'max_prob'"):
        eecompile.compile_model(tmp_path / "s.yaml", tmp_path / "b.eebundle")


def test_built_in_heads_with_a_learned_lambda(palbert) -> None:
    """Built-in linear heads with ``score: agreement`` as lambda, trained by train-heads, Q-exit gates."""
    from eecompile.train import train_heads

    model, layers, tmp = palbert
    exits = [{"at": layers[k], "head": {"kind": "linear", "options": {"pool": "first", "score": "agreement"}},
              "gate": {"kind": "q_exit", "threshold": 0.9}} for k in (1, 3)]
    (tmp / "built.yaml").write_text(yaml.safe_dump({
        "model": str(model), "exits": exits, "final": {"output": "logits", "drop": ["logits1", "lam1", "logits2", "lam2"]}}))
    path = eecompile.compile_model(tmp / "built.yaml", tmp / "built.eebundle").path
    x, y = data(800, seed=4)
    np.savez(tmp / "train.npz", x=x)
    report = train_heads(path, tmp / "train.npz", epochs=20, quiet=True)
    for h in report.heads:
        assert h.score == "agreement" and h.score_loss < h.score_baseline, h
    never = eecompile.load(path).run({"x": x[:64]}, thresholds="never", policy="never")
    assert (never.gate_scores[1] >= never.gate_scores[0] - 1e-6).all()  # the halting probability only grows
    q = float(np.median(never.gate_scores[1]))
    check_compaction(eecompile.load(path), {"x": x[:64]}, [q, q], "logits")


def test_train_heads_trains_palberts_lambdas_jointly(palbert) -> None:
    """Built-in heads with ``score: halting`` on Q-exit gates: train-heads fits the lambdas with PALBERT's objective
    (self-distillation, no labels), calibrate searches one q, and the bundle runs with it. The trained lambda is
    larger where the exit agrees with the final exit (held-out samples) and beats the prior's constant lambda."""
    from eecompile.calibrate import calibrate_bundle
    from eecompile.train import train_heads

    model, layers, tmp = palbert
    exits = [{"at": layers[k], "head": {"kind": "linear", "options": {"pool": "first", "score": "halting"}},
              "gate": {"kind": "q_exit", "threshold": 0.9}} for k in (1, 3)]
    (tmp / "halting.yaml").write_text(yaml.safe_dump({"model": str(model), "exits": exits, "final": {
        "output": "logits", "drop": ["logits1", "lam1", "logits2", "lam2"]}}))
    path = eecompile.compile_model(tmp / "halting.yaml", tmp / "halting.eebundle").path
    x, _ = data(1400, seed=5)
    np.savez(tmp / "halting-train.npz", x=x[:800])
    report = train_heads(path, tmp / "halting-train.npz", epochs=20, quiet=True)
    assert [h.score for h in report.heads] == ["halting", "halting"]
    assert report.heads[0].score_loss < report.heads[0].score_baseline, report.heads[0]
    runner = eecompile.load(path)
    held = runner.run({"x": x[1000:]}, thresholds="never", policy="never")
    final = held.all_exits[-1]["logits"].argmax(1)
    agree = held.all_exits[0]["logits"].argmax(1) == final
    lam1 = held.gate_scores[0]
    assert 0 < agree.sum() < len(agree) and lam1.std() > 0.01
    assert lam1[agree].mean() > lam1[~agree].mean() + 0.03, (lam1[agree].mean(), lam1[~agree].mean())
    # One shared q, calibrated; the Q-exit gates leave samples at both exits with it.
    np.savez(tmp / "halting-cal.npz", x=x[800:1000])
    cal = calibrate_bundle(path, tmp / "halting-cal.npz", max_drop=0.05, costs=[1, 1, 1], quiet=True)
    assert cal.deployed, cal.summary_lines()
    q = eecompile.Bundle.load(path).manifest.thresholds
    assert q[0] == q[1] and 0 < q[0] < 1, q
    res = check_compaction(eecompile.load(path), {"x": x[1000:1064]}, q, "logits")
    assert (res.exit_index < 2).any()
