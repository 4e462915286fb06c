"""Bad input to the decoder compile path and the decoding loop: each one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from eecompile.compiler import compile_model
from eecompile.errors import BundleError, DataError, GraphError, SpecError
from eecompile.runtimes.lm import DecoderRunner


def _spec(tmp: Path, lm_dir: Path, exits: list[dict], **extra: object) -> Path:
    spec = {"kind": "decoder", "model": str(lm_dir / "tiny.onnx"), "exits": exits, **extra}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_decoder_without_kv_cache_is_refused(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).ravel())
    g = helper.make_graph([helper.make_node("Gather", ["w", "input_ids"], ["logits"])], "nokv", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "nokv.onnx")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"kind": "decoder", "model": "nokv.onnx", "exits": [{"after_layer": 0}]}))
    with pytest.raises(GraphError, match="not a decoder with a key/value cache.*past_key_values"):
        compile_model(spec, tmp_path / "out.eebundle")
    assert not (tmp_path / "out.eebundle").exists()


def test_exit_inside_a_layer_is_refused(tmp_path: Path, lm_dir: Path) -> None:
    for inside in ["/model/model/layers.1/self_attn/o_proj/MatMul_output_0",
                   "/model/model/layers.1/post_attention_layernorm/Pow_output_0"]:
        with pytest.raises(SpecError, match="inside a decoder layer"):
            compile_model(_spec(tmp_path, lm_dir, [{"at": inside}]), tmp_path / "out.eebundle")


@pytest.mark.parametrize("exits, match", [
    ([{"after_layer": 3}], "last layer's output"),
    ([{"after_layer": 9}], "no tensor 'layers.9.output'"),
    ([{"after_layer": 2}, {"after_layer": 1}], "layer order"),
    ([{"after_layer": 1, "gate": {"kind": "entropy"}}], r"exits\[0\].gate.kind"),
    ([{"after_layer": 1, "gate": {"threshold": 1.5}}], r"exits\[0\].gate.threshold"),
    ([{"after_layer": 1, "draft_tokens": 0}], r"exits\[0\].draft_tokens"),
    ([{"after_layer": 1, "at": "layers.1.output"}], "exactly one of"),
    ([], "at least one exit"),
])
def test_bad_decoder_specs_name_the_yaml_path(tmp_path: Path, lm_dir: Path, exits: list[dict], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        compile_model(_spec(tmp_path, lm_dir, exits), tmp_path / "out.eebundle")


def test_prompt_longer_than_the_cache(runner: DecoderRunner) -> None:
    with pytest.raises(DataError, match=r"prompts\[1\]: 90 tokens \+ max_new_tokens 10 exceed the cache \(96"):
        runner.generate([[1, 2], [3] * 90], 10, mode="speculative")


@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_must_be_positive(runner: DecoderRunner, n: int) -> None:
    with pytest.raises(DataError, match="max_new_tokens"):
        runner.generate([[1, 2]], n)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "fast"}, "mode: 'fast'"),
    ({"thresholds": [0.5, 0.5]}, "one per exit"),
    ({"thresholds": 2.0}, r"thresholds\[0\]"),
    ({"exit": 1}, "exit: 1"),
    ({"draft_tokens": 0}, "draft_tokens"),
    ({"sample": True, "temperature": 0.0}, "temperature"),
])
def test_bad_generate_options(runner: DecoderRunner, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        runner.generate([[1, 2]], 3, **kwargs)


@pytest.mark.parametrize("seed", [-1, 1.5, "7"])
def test_a_seed_that_is_not_a_non_negative_integer(runner: DecoderRunner, seed: object) -> None:
    """numpy's own error ("expected non-negative integer") was an internal error in `generate` and HTTP 500."""
    with pytest.raises(DataError, match=r"seed: .*give a non-negative integer"):
        runner.generate([[1, 2]], 3, sample=True, seed=seed)  # type: ignore[arg-type]
    batch = runner.open_batch("none")
    with pytest.raises(DataError, match=r"seed: .*give a non-negative integer"):
        batch.add([1, 2], 3, sample=True, seed=seed)  # type: ignore[arg-type]
    batch.close()


def test_token_ids_outside_the_vocabulary(runner: DecoderRunner) -> None:
    with pytest.raises(DataError, match=r"prompts\[0\]: token id 128 is outside the vocabulary"):
        runner.generate([[1, 128]], 3)
    with pytest.raises(DataError, match=r"prompts\[0\]: empty"):
        runner.generate([[]], 3)


def test_tokenizer_that_does_not_match_the_vocabulary(lm_bundle: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
    big.save(str(tmp_path / "big.json"))
    r = DecoderRunner(lm_bundle, threads=1, tokenizer=tmp_path / "big.json")
    with pytest.raises(DataError, match="tokenizer has 300 tokens but the model's vocabulary has 128"):
        r.generate(["hello"], 3)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizer.json"):
        DecoderRunner(lm_bundle, threads=1, tokenizer=tmp_path / "bad.json").generate(["hello"], 3)


def test_generate_on_a_single_pass_bundle(tmp_path: Path) -> None:
    from eecompile.bundle import Manifest, staged_bundle, write_manifest

    with staged_bundle(tmp_path / "plain.eebundle") as tmp:
        write_manifest(tmp, Manifest(source_model={"file": "m.onnx", "sha256": "0"}, inputs=[], outputs=[],
                                     segments=[]))
    with pytest.raises(BundleError, match="not a decoder bundle.*kind: decoder"):
        DecoderRunner(tmp_path / "plain.eebundle")


def test_text_prompt_without_a_tokenizer(lm_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, lm_dir, [{"after_layer": 1}])
    compile_model(spec, tmp_path / "notok.eebundle")
    r = DecoderRunner(tmp_path / "notok.eebundle", threads=1)
    with pytest.raises(DataError, match="no tokenizer; give token ids"):
        r.generate(["hello"], 3)
    assert len(r.generate([[1, 2, 3]], 3).results[0]["token_ids"]) == 3


def test_single_pass_runner_on_a_decoder_bundle(lm_bundle: Path) -> None:
    from eecompile.runtimes.chain import EarlyExitRunner

    with pytest.raises(BundleError, match="decoder bundle.*eecompile generate"):
        EarlyExitRunner(lm_bundle)


@pytest.mark.parametrize("command", [
    ["run", "{b}", "--data", "{d}", "-o", "{t}/out.npz"],
    ["bench", "{b}", "--data", "{d}"],
    ["build", "{b}", "--backend", "onnxruntime"],
    ["verify", "{b}", "--backend", "onnxruntime"],
])
def test_classifier_commands_on_a_decoder_bundle(lm_bundle: Path, tmp_path: Path, command: list[str]) -> None:
    """run/bench/build/verify on a decoder bundle: one line that points at `generate`, and the
    bundle and the output untouched (before: 'the manifest lists no segments', an internal error in build).
    `export triton` writes a decoupled generate model for it (tests/serve/test_triton_generate.py); `calibrate`
    calibrates its decoding modes (tests/lm/test_calibrate_cli.py)."""
    from tests.bad_inputs.util import expect_error

    data = tmp_path / "in.npz"
    np.savez(data, input_ids=np.ones((2, 3), np.int64))
    args = [a.format(b=lm_bundle, d=data, t=tmp_path) for a in command]
    err = expect_error(args, BundleError, str(lm_bundle), "a decoder bundle", "eecompile generate",
                       workspace=lm_bundle)
    assert "no segments" not in err.message
    assert not (tmp_path / "out.npz").exists() and not (tmp_path / "repo").exists()
