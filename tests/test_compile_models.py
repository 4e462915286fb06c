"""No-exit equivalence on real third-party graphs: compile with 2-4 exits, and the compile's own verify step
(chain with no exit == unsplit model, ORT CPU, batch 1 and 4, max abs error <= 1e-5 of the output scale)
must pass; then check it again here through the runtime, independently of the compiler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_head, write_spec, zoo_model

import eecompile
from eecompile.analysis.probe import DEFAULT_DIM

pytestmark = pytest.mark.slow  # real graphs (model zoo, torch and Hugging Face exports)

# (zoo model, [(cut tensor, channels)], final class axis)
ZOO_CASES = {
    "resnet50": ([("r35", 256), ("r67", 512), ("r99", 1024), ("r139", 1024)], -1),
    "densenet121": ([("r103", 256), ("r291", 512)], 1),
    "inception_v1": ([("r23", 256), ("r38", 480), ("r94", 528)], -1),
    "squeezenet": ([("r11", 16), ("r26", 32), ("r48", 64)], 1),
}
GATES = ["max_prob", "entropy", "margin", "patience"]


def _feeds(path: Path, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [batch] + [d if isinstance(d, int) else DEFAULT_DIM for d in i.shape[1:]]
        if "float" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        elif i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 50, shape).astype(np.int64)
        else:
            m = np.ones(shape, np.int64)
            m[:, shape[1] // 2 + 1:] = rng.integers(0, 2, (shape[0], shape[1] - shape[1] // 2 - 1))
            feeds[i.name] = m
    return feeds


def _check_no_exit(model_path: Path, bundle: Path, batch: int = 3) -> None:
    feeds = _feeds(model_path, batch, seed=42)
    ref_sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    if ref_sess.get_inputs()[0].shape[0] == 1:  # exported at batch 1: the reference runs one sample at a time
        ref = np.concatenate([ref_sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[0] for i in range(batch)])
    else:
        ref = ref_sess.run(None, feeds)[0]
    runner = eecompile.load(bundle)
    res = runner.run(feeds, thresholds="never")
    got = next(iter(res.outputs.values()))
    scale = float(np.abs(ref).max())
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 1e-5 * scale
    assert (res.exit_index == len(runner.manifest.segments) - 1).all()


@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_zoo_graph_compiles_and_matches(name: str, tmp_path: Path) -> None:
    model = zoo_model(name)
    cuts, axis = ZOO_CASES[name]
    exits = []
    for i, (t, c) in enumerate(cuts):
        head = make_head(tmp_path / f"h{i}.onnx", [1, c, 7, 7], 1000, opset=9, seed=i)
        exits.append({"at": t, "head": str(head), "gate": {"kind": GATES[i % 4],
                                                           "threshold": 2 if GATES[i % 4] == "patience" else 0.5}})
    spec = write_spec(tmp_path, model, exits, {"class_axis": axis})
    bundle = eecompile.compile_model(spec, tmp_path / "m.eebundle")
    m = bundle.manifest
    assert len(m.segments) == len(cuts) + 1
    assert m.batch_mode == "dynamic"  # exported at batch 1; the Reshape target got fixed
    assert all(s.carried_out == [c[0]] for s, c in zip(m.segments, cuts, strict=False))
    assert abs(sum(s.flops_fraction for s in m.segments) - 1.0) < 0.01
    _check_no_exit(model, bundle.path)


TORCH_CASES = {
    "resnet": (["/layers.0/Relu_1_output_0", "/layers.2/Relu_1_output_0", "/layers.3/Relu_1_output_0"],
               [[1, 16, 32, 32], [1, 32, 16, 16], [1, 64, 8, 8]], 10),
    "vit": (["/layers.0/ln2/LayerNormalization_output_0", "/layers.1/ln2/LayerNormalization_output_0",
             "/layers.2/ln2/LayerNormalization_output_0"], [[1, 17, 32]] * 3, 10),
    "bert": (["/layers.0/ln2/LayerNormalization_output_0", "/layers.2/ln2/LayerNormalization_output_0"],
             [[1, 8, 32]] * 2, 3),
    # torch.export-based exporter (the default since torch 2.9): opset 18, external data, its own names.
    "dynamo-resnet": (["relu_2", "relu_6"], [[1, 16, 32, 32], [1, 32, 16, 16]], 10),
    "dynamo-bert": (["layer_norm_1", "layer_norm_4"], [[1, 8, 32]] * 2, 3),
}


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_torch_exported_model_compiles_and_matches(name: str, tmp_path: Path, torch_model) -> None:
    model = torch_model(name)
    cuts, shapes, n = TORCH_CASES[name]
    exits = [{"at": t, "head": str(make_head(tmp_path / f"h{i}.onnx", s, n, seed=i)),
              "gate": {"kind": GATES[i % 3], "threshold": 0.5}} for i, (t, s) in enumerate(zip(cuts, shapes, strict=True))]
    spec = write_spec(tmp_path, model, exits)
    bundle = eecompile.compile_model(spec, tmp_path / "m.eebundle")
    m = bundle.manifest
    assert len(m.segments) == len(cuts) + 1
    # Transformers: only the hidden state crosses each cut; the attention mask is recomputed per segment.
    for seg, cut in zip(m.segments, cuts, strict=False):
        assert seg.carried_out == [cut]
    if name.endswith("bert"):
        later_inputs = {t.name for s in m.segments[1:] for t in s.inputs}
        assert "attention_mask" in later_inputs
    _check_no_exit(model, bundle.path)


def test_gpt_style_decoder_with_folded_batch_and_dynamic_sequence(tmp_path: Path, torch_model) -> None:
    from eecompile.compiler import analyze_model

    model = torch_model("gpt")
    report = analyze_model(model)
    by_name = {c.tensor: c for c in report.cut_points}
    blocks = [f"/blocks.{i}/Add_1_output_0" for i in range(3)]
    for b in blocks:  # block outputs: the hidden state alone crosses (mask and positions are recomputed)
        assert by_name[b].problem is None and by_name[b].carried == [b]
    folded = [c for c in report.cut_points if c.problem and "folds the batch" in c.problem]
    assert folded, "the [B*T, C] MLP tensors must be refused as cut points"
    exits = [{"at": blocks[0], "head": {"kind": "token"}, "gate": {"kind": "max_prob", "threshold": 0.5}},
             {"at": blocks[2], "head": {"kind": "token"}, "gate": {"kind": "entropy", "threshold": 0.3}}]
    bundle = eecompile.compile_model(write_spec(tmp_path, model, exits), tmp_path / "g.eebundle")
    carried = next(t for t in bundle.manifest.segments[1].inputs if t.name == blocks[0])
    assert carried.shape == ["batch", "seq", 32]  # the sequence axis stays symbolic
    runner = eecompile.load(bundle.path)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for seq in (8, 5):
        ids = np.random.default_rng(seq).integers(0, 50, (3, seq)).astype(np.int64)
        got = runner.run({"input_ids": ids}, thresholds="never").outputs["logits"]
        ref = sess.run(None, {"input_ids": ids})[0]
        assert got.shape == (3, seq, 50)
        assert float(np.abs(got - ref).max()) <= 1e-5 * float(np.abs(ref).max())
        forced = runner.run({"input_ids": ids}, thresholds=["always", "never"])
        assert (forced.exit_index == 0).all() and forced.outputs["logits"].shape == (3, seq, 50)


def test_masked_mean_head_reads_the_attention_mask(tmp_path: Path, torch_model) -> None:
    """`at: [hidden, attention_mask]` with `pool: masked_mean`: the head's second input is the model's mask,
    padded tokens do not change the exit's output, and the head trains and splices like any other."""
    from eecompile.train import train_heads

    model = torch_model("bert")
    layer0 = "/layers.0/ln2/LayerNormalization_output_0"
    exits = [{"at": [layer0, "attention_mask"], "head": {"kind": "linear", "options": {"pool": "masked_mean"}},
              "gate": {"kind": "max_prob", "threshold": 0.9}}]
    bundle = eecompile.compile_model(write_spec(tmp_path, model, exits), tmp_path / "m.eebundle")
    assert "attention_mask" in [t.name for t in bundle.manifest.segments[0].inputs]
    feeds = _feeds(model, 64, seed=1)
    np.savez(tmp_path / "train.npz", **feeds)
    train_heads(bundle.path, tmp_path / "train.npz", epochs=3, quiet=True)
    runner = eecompile.load(bundle.path)
    forced = runner.run(feeds, thresholds=["always"]).outputs["logits"]
    assert np.abs(forced).max() > 0  # trained: no longer the all-zero untrained head
    # Changing the ids of padded positions moves the backbone's hidden states there, not the masked mean.
    changed = {k: v.copy() for k, v in feeds.items()}
    pad = changed["attention_mask"] == 0
    assert pad.any()
    changed["input_ids"][pad] = (changed["input_ids"][pad] + 7) % 50
    again = runner.run(changed, thresholds=["always"]).outputs["logits"]
    np.testing.assert_allclose(again, forced, rtol=1e-4, atol=1e-5)
