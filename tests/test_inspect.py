"""describe_bundle / print_bundle on a handmade bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eecompile.errors import BundleError
from eecompile.inspect import describe_bundle, print_bundle
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
