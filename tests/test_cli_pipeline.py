"""The whole user journey through the command line, as the README shows it: analyze -> compile -> train-heads
-> calibrate -> build -> run -> bench -> inspect, on a PyTorch-exported ResNet with trained heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from eecompile.cli import cli


def _ok(*args: str | Path) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.output


@pytest.mark.slow
def test_cli_pipeline(tmp_path: Path, torch_model) -> None:
    model = torch_model("resnet")
    analysis = json.loads(_ok("analyze", model, "--json"))
    cuts = analysis["suggested"][:2]
    assert len(cuts) == 2
    spec = {"model": str(model), "exits": [{"at": c, "head": {"kind": "linear"}, "gate": {"kind": "max_prob", "threshold": 0.9}}
                                           for c in cuts]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    bundle = tmp_path / "m.eebundle"
    out = _ok("compile", tmp_path / "spec.yaml", "-o", bundle)
    assert "untrained heads" in out and "verified" in out
    rng = np.random.default_rng(0)
    for name, n in (("train", 96), ("cal", 160), ("test", 40)):
        np.savez(tmp_path / f"{name}.npz", image=rng.standard_normal((n, 3, 32, 32)).astype(np.float32))
    _ok("train-heads", bundle, "--data", tmp_path / "train.npz", "--epochs", "3")
    _ok("calibrate", bundle, "--data", tmp_path / "cal.npz", "--max-drop", "0.1", "--plot", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    _ok("build", bundle, "--backend", "onnxruntime")
    _ok("run", bundle, "--data", tmp_path / "test.npz", "-o", tmp_path / "out.npz", "--batch", "16")
    res = np.load(tmp_path / "out.npz")
    assert res["logits"].shape == (40, 10) and res["exit_index"].shape == (40,)
    assert set(res["exit_index"].tolist()) <= {0, 1, 2}
    bench = json.loads(_ok("bench", bundle, "--data", tmp_path / "test.npz", "--repeats", "3", "--json"))
    assert bench  # the fields are checked in tests/test_benchmark.py
    info = json.loads(_ok("inspect", bundle, "--json"))
    assert info["calibration"]["max_drop"] == 0.1 and info["engines"] and not info["problems"]
