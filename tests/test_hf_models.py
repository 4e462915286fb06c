"""Hugging Face transformers graphs (random weights from a small config, nothing downloaded): BERT with its
extended attention mask and token types, GPT-2 (torch.export-based exporter, causal mask, token logits), ViT,
ConvNeXt. Each compiles at the cut points `analyze` suggests, verifies (no exit == the model), and keeps the
compaction invariant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.compiler import analyze_model

pytestmark = pytest.mark.slow  # real graphs (model zoo, torch and Hugging Face exports)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _export(name: str, path: Path) -> dict[str, np.ndarray]:
    """Export a small random-weight model; returns example inputs (batch 5)."""
    torch.manual_seed(0)
    t = transformers
    rng = np.random.default_rng(0)
    if name == "bert":
        model = t.BertForSequenceClassification(t.BertConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=100,
            max_position_embeddings=16, num_labels=3))
        mask = np.ones((5, 8), np.int64)
        mask[1, 5:] = 0
        feeds = {"input_ids": rng.integers(0, 100, (5, 8)).astype(np.int64), "attention_mask": mask}
    elif name == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=100, n_positions=16,
                                               bos_token_id=0, eos_token_id=0, use_cache=False))
        feeds = {"input_ids": rng.integers(0, 100, (5, 8)).astype(np.int64)}
    elif name == "vit":
        model = t.ViTForImageClassification(t.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                        intermediate_size=64, image_size=16, patch_size=4,
                                                        num_labels=10))
        feeds = {"pixel_values": rng.standard_normal((5, 3, 16, 16)).astype(np.float32)}
    else:
        model = t.ConvNextForImageClassification(t.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1],
                                                                  num_labels=10, image_size=32))
        feeds = {"pixel_values": rng.standard_normal((5, 3, 32, 32)).astype(np.float32)}
    model.eval()
    names = list(feeds)
    example = tuple(torch.from_numpy(v[:2]) for v in feeds.values())

    class Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.m(**dict(zip(names, args, strict=True))).logits

    with torch.no_grad():
        if name == "gpt2":  # the TorchScript exporter cannot export GPT-2's mask code (aten::diff)
            batch = torch.export.Dim("batch", min=1, max=64)
            torch.onnx.export(Logits(model).eval(), example, str(path), input_names=names, output_names=["logits"],
                              dynamo=True, dynamic_shapes=(tuple({0: batch} for _ in names),), opset_version=18)
        else:
            axes = {n: {0: "batch"} for n in [*names, "logits"]}
            torch.onnx.export(Logits(model).eval(), example, str(path), input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
    return feeds


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "convnext"])
def test_hf_model_compiles_verifies_and_compacts(name: str, tmp_path: Path) -> None:
    model = tmp_path / f"{name}.onnx"
    feeds = _export(name, model)
    report = analyze_model(model)
    cuts = report.suggested[:3]
    assert len(cuts) == 3
    by_name = {c.tensor: c for c in report.valid}
    assert all(len(by_name[c].carried) == 1 for c in cuts)  # masks and positions are recomputed, not carried
    if name == "bert":  # layer outputs (the residual stream), not attention internals at the same FLOPs
        assert all(c.endswith("LayerNorm/LayerNormalization_output_0") for c in cuts), cuts
    head = {"kind": "token"} if name == "gpt2" else {"kind": "linear"}
    kinds = ["max_prob", "patience", "margin"]
    spec = {"model": str(model), "exits": [{"at": c, "head": head, "gate": {"kind": k, "threshold": 1 if k == "patience" else 0.3}}
                                           for c, k in zip(cuts, kinds, strict=True)]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    bundle = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle")  # verifies, or raises
    assert any(n.startswith("verified") for n in bundle.manifest.notes)
    runner = eecompile.load(bundle.path)
    # Untrained heads give uniform probabilities: patience (first vote at exit 1 needs 1 agreeing exit) and
    # forced exits split the batch; compact, wait-all and forced exits must agree row by row.
    for thresholds in (["never", "always", "never"], [0.3, 1, "never"], ["never", "never", "always"]):
        compact = runner.run(feeds, thresholds=thresholds)
        wait = runner.run(feeds, thresholds=thresholds, policy="wait-all")
        np.testing.assert_array_equal(compact.exit_index, wait.exit_index)
        np.testing.assert_allclose(compact.outputs["logits"], wait.outputs["logits"], rtol=1e-6)
