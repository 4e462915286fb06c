"""describe_bundle / print_bundle on a handmade bundle and on the tests' tiny decoder bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eecompile.errors import BundleError
from eecompile.inspect import describe_bundle, print_bundle
from tests.lm.conftest import lm_bundle, lm_dir  # noqa: F401  (the tiny Llama decoder bundle, built once)
from tests.runtimes.handmade import make_bundle


def test_describe(tmp_path: Path) -> None:
    hm = make_bundle(tmp_path / "b.eebundle", thresholds=(0.55, 0.8))
    d = describe_bundle(hm.path)
    json.dumps(d)  # JSON-able
    assert d["format_version"] == 1 and d["batch_mode"] == "dynamic" and "dynamic" in d["batch"]
    assert [t["name"] for t in d["inputs"]] == ["x", "ids"]
    assert d["thresholds"] == [0.55, 0.8] and d["n_early_exits"] == 2
    s0, s1, s2 = d["segments"]
    assert s0["gate"]["kind"] == "max_prob" and s0["gate"]["threshold"] == 0.55
    assert {t["name"]: t["batch_axis"] for t in s0["carried_out"]} == {"hT": 1, "pos": None}
    assert {t["name"]: t["batch_axis"] for t in s1["carried_in"]} == {"hT": 1, "pos": None}
    assert s2["model_inputs"] == ["ids"] and s2["gate"] is None and s2["exit"]["final"]
    assert s0["flops_fraction"] == pytest.approx(0.4)
    assert d["problems"] == [] and d["engines"] == [] and d["calibration"] is None


def test_per_sample_is_stated(tmp_path: Path) -> None:
    d = describe_bundle(make_bundle(tmp_path / "p.eebundle", per_sample=True).path)
    assert d["batch_mode"] == "per_sample" and "one sample at a time" in d["batch"]


def test_damaged_bundle_is_described_with_problems(tmp_path: Path) -> None:
    hm = make_bundle(tmp_path / "b.eebundle")
    (hm.path / "segments/seg0.onnx").write_bytes(b"broken")
    d = describe_bundle(hm.path)
    assert len(d["problems"]) == 1 and "seg0.onnx" in d["problems"][0]
    # The CLI shows the damage but does not report success (scripts check the exit code).
    from click.testing import CliRunner

    from eecompile.cli import cli

    for args in (["inspect", str(hm.path)], ["inspect", "--json", str(hm.path)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "seg0.onnx" in result.output


def test_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle"):
        describe_bundle(tmp_path / "nope")


def test_print(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    print_bundle(make_bundle(tmp_path / "b.eebundle").path)
    out = capsys.readouterr().out
    assert "segments" in out and "max_prob" in out and "hT" in out and "no batch axis" in out


def test_print_shows_shapes_that_look_like_console_markup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A symbolic dim such as `time` made "[time, B, 4]" read as a rich style tag: the shape vanished."""
    import yaml

    hm = make_bundle(tmp_path / "b.eebundle")
    doc = yaml.safe_load((hm.path / "manifest.yaml").read_text())
    doc["inputs"][0]["shape"] = ["time", "B", 4]
    doc["inputs"][0]["batch_axis"] = 1
    (hm.path / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    print_bundle(hm.path)
    out = capsys.readouterr().out
    assert "x [time, B, 4] float32" in out and "hT [2, B, 4]" in out, out


def _decoder_bundle(source: Path, tmp: Path, kv_cache: str) -> Path:
    """The tiny Llama of tests/lm (in ``source``) compiled again with ``kv_cache``."""
    import yaml

    from eecompile.decoder.compile import compile_decoder

    spec = yaml.safe_load((source / "spec.yaml").read_text())
    spec.update(model=str(source / "tiny.onnx"), tokenizer=str(source / "tokenizer.json"), kv_cache=kv_cache)
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    compile_decoder(tmp / "spec.yaml", tmp / f"{kv_cache}.eebundle")
    return tmp / f"{kv_cache}.eebundle"


def test_a_decoder_bundle_shows_its_segments_caches_and_exits(lm_bundle: Path, lm_dir: Path,  # noqa: F811
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """inspect used to print an empty segments table for a decoder bundle (its segments are manifest.decoder's)."""
    d = describe_bundle(lm_bundle)["decoder"]
    assert d["layers"] == 4 and d["max_length"] == 96
    s0, s1 = d["segments"]
    assert (s0["layers"], s1["layers"]) == ([0, 2], [2, 4]) and s0["kv_cache"] == s1["kv_cache"] == "in-place"
    # the cache tensors each segment's graph reads and writes: its own layers' only
    assert s1["kv_inputs"] == [f"past_key_values.{i}.{t}" for i in (2, 3) for t in ("key", "value")]
    assert s1["kv_outputs"] == [f"present.{i}.{t}" for i in (2, 3) for t in ("key", "value")]
    assert s1["hidden_in"] == "hidden" and s0["hidden_in"] is None
    (e,) = d["exits"]
    assert (e["after_layer"], e["segment"], e["gate"]["kind"], e["draft_tokens"], e["draft_head"]) == \
        (1, 0, "max_prob", 4, None)

    print_bundle(lm_bundle)
    out = capsys.readouterr().out
    for shown in ("decoder segments", "segment0.onnx", "segment1.onnx", "past_key_values.3.value", "present.0.key",
                  "in place (TensorScatter)", "layers.1.output", "untrained", "head.onnx"):
        assert shown in out, shown

    concat = _decoder_bundle(lm_dir, tmp_path, "concat")
    assert {s["kv_cache"] for s in describe_bundle(concat)["decoder"]["segments"]} == {"concat"}
    print_bundle(concat)
    assert "Concat (copy per call)" in capsys.readouterr().out


def test_a_chain_bundle_has_no_decoder_section(tmp_path: Path) -> None:
    assert describe_bundle(make_bundle(tmp_path / "b.eebundle").path)["decoder"] is None


@pytest.mark.parametrize("kind, value, shown", [
    ("max_prob", float("inf"), "never"), ("max_prob", float("-inf"), "always"),
    ("entropy", float("-inf"), "never"), ("entropy", float("inf"), "always"),
    ("change", float("-inf"), "never"), ("change", float("inf"), "always"),  # change fires when score <= t
    ("logit_gap", float("inf"), "never"), ("score", 0.25, "0.25"),
])
def test_infinite_thresholds_read_never_or_always_by_the_gates_direction(kind: str, value: float, shown: str) -> None:
    """Calibration writes "never exit here" as +inf, or -inf for gates firing below their threshold (entropy and
    change, exit and loop gates alike); a change gate at -inf used to read "always"."""
    from eecompile.inspect import _loop_threshold, _threshold

    assert _threshold(value, kind) == shown
    assert _loop_threshold({"kind": kind, "threshold": [value, value]}) == f"[{shown}, {shown}] (staged)"


def test_a_calibrated_loop_bundle_shows_its_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A loop gate's calibration rows are steps: the table said "exit", "share exiting", "accuracy of those
    exiting" and the summary "accuracy 1.0000 -> ..." for them."""
    import numpy as np

    import eecompile
    from eecompile.calibrate import calibrate_bundle
    from tests.loops.models import export_shift, shift_loop_spec

    bundle = eecompile.compile_model(shift_loop_spec(tmp_path, export_shift(tmp_path / "shift.onnx")),
                                     tmp_path / "l.eebundle", engines=False).path
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32))
    calibrate_bundle(bundle, tmp_path / "x.npz", max_drop=0.3, error_budget=0.5, costs=[1e-3] * 3, quiet=True)
    capsys.readouterr()
    print_bundle(bundle)
    out = capsys.readouterr().out
    assert "stop after" in out and "within error budget of those stopping" in out and "step 1" in out, out
    assert "of 3 steps on average" in out and "accuracy" not in out, out
