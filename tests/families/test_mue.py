"""MuE (Tang et al. 2023): exits at every layer of a Transformer, each deciding by the saturation of the hidden
state, cos(h_in, h_out) between the layer's input and output. The first exit compares with the layer input,
the embedding output, named in the spec (``gate: {kind: saturation, against: TENSOR}``); later exits compare
with the previous exit's cut tensor.

The stand-in: tokens x [B, 8, 12] -> Linear to 16 + positions, a class token prepended, LayerNorm (the
embedding output [B, 9, 16]) -> four Transformer-style layers (self-attention + MLP) -> logits [B, 3] from the
class token. (MuE's encoder-decoder exits, which jump to the decoder, are a separate feature.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.errors import SpecError

from .util import check_compaction, export, fit_classifier, transformer_layer

pytestmark = pytest.mark.slow  # a small Transformer trained for a few steps, compiled six times: ~25 s

T, F, D, C = 8, 12, 16, 3
EMB = "/emb_ln/LayerNormalization_output_0"


def layer_out(i: int) -> str:
    return f"/layers.{i}/ln2/LayerNormalization_output_0"


def make_mue(path: Path, prune: bool = False) -> tuple[Path, object]:
    """The model and its torch module; ``prune`` keeps only the first 5 tokens after layer 1 (token pruning),
    so exits at layers 0 and 1 see different token counts."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)

    class MuE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.emb_ln = nn.Linear(F, D), nn.LayerNorm(D)
            self.pos = nn.Parameter(torch.randn(1, T + 1, D) * 0.1)
            self.cls_token = nn.Parameter(torch.randn(1, 1, D))
            self.layers = nn.ModuleList(transformer_layer(D, mlp_scale=0.3) for _ in range(4))
            self.fc = nn.Linear(D, C)

        def hidden(self, x):
            h = torch.cat([self.cls_token.expand(x.shape[0], 1, D), self.proj(x)], 1)
            hs = [self.emb_ln(h + self.pos)]
            for i, layer in enumerate(self.layers):
                hs.append(layer(hs[-1]))
                if prune and i == 1:
                    hs[-1] = hs[-1][:, :5]
            return hs

        def forward(self, x):
            return self.fc(self.hidden(x)[-1][:, 0])

    model = fit_classifier(MuE(), tokens, steps=60)
    return export(model, (torch.randn(2, T, F),), path, ["x"], ["logits"]), model


def tokens(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens; the class is the argmax of a fixed projection of their mean (plus noise)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, T, F)).astype(np.float32)
    w = np.random.default_rng(7).standard_normal((F, C))
    return x, np.argmax(x.mean(1) @ w + 0.3 * rng.standard_normal((n, C)), 1)


@pytest.fixture(scope="module")
def mue(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    return make_mue(tmp_path_factory.mktemp("mue") / "mue.onnx")


def cosine_min(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The saturation gate's score: the least cosine over tokens."""
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return cos.min(1)


def spec(tmp: Path, model: Path, first: dict | None = None, name: str = "spec.yaml", layers=(0, 1, 2)) -> Path:
    exits = [{"at": layer_out(i), "head": {"kind": "linear", "options": {"pool": "first"}},
              "gate": {"kind": "saturation", "threshold": 0.9}} for i in layers]
    exits[0]["gate"].update(first if first is not None else {"against": EMB})
    (tmp / name).write_text(yaml.safe_dump({"model": str(model), "exits": exits}, sort_keys=False))
    return tmp / name


def test_first_exit_compares_with_the_embeddings_and_can_fire(mue, tmp_path: Path) -> None:
    import torch

    model, module = mue
    runner = eecompile.load(eecompile.compile_model(spec(tmp_path, model), tmp_path / "b.eebundle").path)
    x = np.random.default_rng(0).standard_normal((48, T, F)).astype(np.float32)
    with torch.no_grad():
        hs = [h.numpy() for h in module.hidden(torch.from_numpy(x))]
    never = runner.run({"x": x}, thresholds="never", policy="never")
    for k in range(3):  # exit k compares layer k's output with its input (the embeddings for k = 0)
        np.testing.assert_allclose(never.gate_scores[k], cosine_min(hs[k], hs[k + 1]), rtol=1e-4, atol=1e-5)
    assert (never.gate_scores[0] > -0.99).all(), "the first exit has a real score (it used to be -1)"
    thr = [float(np.quantile(s, 0.5)) for s in never.gate_scores]
    res = check_compaction(runner, {"x": x}, thr, "logits")
    assert (res.exit_index == 0).any()


def test_trained_and_calibrated(mue, tmp_path: Path) -> None:
    """train-heads distils the exits' heads; calibrate picks saturation thresholds within a 10-point budget on
    agreement with the final exit, and it holds on held-out samples."""
    from eecompile.calibrate import calibrate_bundle
    from eecompile.train import train_heads

    model, _ = mue
    path = eecompile.compile_model(spec(tmp_path, model), tmp_path / "b.eebundle").path
    x, _ = tokens(2000, seed=1)
    np.savez(tmp_path / "train.npz", x=x[:800])
    report = train_heads(path, tmp_path / "train.npz", epochs=15, quiet=True)
    assert all(h.agree_before < 0.6 and h.agree_after > 0.7 for h in report.heads), report.heads
    np.savez(tmp_path / "cal.npz", x=x[800:1500])
    cal = calibrate_bundle(path, tmp_path / "cal.npz", max_drop=0.1, costs=[1, 2, 3, 4], quiet=True)
    assert cal.deployed, cal.summary_lines()
    runner = eecompile.load(path)
    final = runner.run({"x": x[1500:]}, thresholds="never").outputs["logits"].argmax(1)
    res = runner.run({"x": x[1500:]})
    assert (res.exit_index < 3).any()
    assert (res.outputs["logits"].argmax(1) != final).mean() <= 0.1


def test_without_against_the_first_exit_never_fires(mue, tmp_path: Path) -> None:
    model, _ = mue
    runner = eecompile.load(eecompile.compile_model(spec(tmp_path, model, first={}), tmp_path / "b.eebundle").path)
    never = runner.run({"x": np.ones((2, T, F), np.float32)}, thresholds="never", policy="never")
    np.testing.assert_array_equal(never.gate_scores[0], -1.0)


@pytest.mark.parametrize("against,match", [
    ("/proj/MatMul_output_0", r"exits\[0\]\.gate\.against: saturation compares '/proj/\S+' \[.*8, 16\] with the cut "
                              r"tensor .*\[.*9, 16\], but their token axis differs \(8 vs 9\)"),
    ("x", r"exits\[0\]\.gate\.against: .*but their width differs \(12 vs 16\)"),
])
def test_against_a_tensor_of_other_tokens_or_width_is_one_spec_error(mue, tmp_path: Path, against: str,
                                                                     match: str) -> None:
    model, _ = mue
    with pytest.raises(SpecError, match=match):
        eecompile.compile_model(spec(tmp_path, model, first={"against": against}), tmp_path / "b.eebundle")


def test_consecutive_exits_with_different_token_counts_are_one_spec_error(tmp_path: Path) -> None:
    model, _ = make_mue(tmp_path / "mue.onnx", prune=True)
    with pytest.raises(SpecError, match=r"exits\[1\]\.gate: saturation compares exit 0's cut tensor \[.*9, 16\] with "
                                        r"exit 1's \[.*5, 16\], but their token axis differs \(9 vs 5\)"):
        eecompile.compile_model(spec(tmp_path, model, first={}, layers=(0, 2, 3)), tmp_path / "b.eebundle")


def test_against_on_a_later_exit_or_another_gate_is_refused(mue, tmp_path: Path) -> None:
    from eecompile.spec import parse_spec

    with pytest.raises(SpecError, match=r"exits\[0\]\.gate\.against \(line \d+\): 'against' names the tensor a "
                                        r"saturation gate compares with; gate kind 'max_prob'"):
        parse_spec("model: m.onnx\nexits:\n- at: a\n  head: {output: o}\n"
                   "  gate: {kind: max_prob, threshold: 0.5, against: e}\n")
    model, _ = mue
    path = spec(tmp_path, model)
    doc = yaml.safe_load(path.read_text())
    doc["exits"][1]["gate"]["against"] = EMB
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"exits\[1\]\.gate\.against: only the first exit names what it compares with"):
        eecompile.compile_model(path, tmp_path / "b.eebundle")
