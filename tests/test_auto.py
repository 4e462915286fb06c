"""`eecompile auto` end to end on scikit-learn's bundled digits: candidate exits at analyze's cuts, heads trained
at once, the fastest subset within the budget compiled, calibrated and written, compared with hand-placed exits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo's backbone (narrower, briefly trained), exported with its three taps, and its splits."""
    import torch

    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    from eecompile.models.export import export_onnx

    d = tmp_path_factory.mktemp("auto_digits")
    data = demo.splits()
    for name, (x, y) in data.items():
        np.savez(d / f"{name}.npz", input=x, labels=y)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = demo.build_backbone(width=1024)  # the demo's width: narrower, exits do not pay at batch 1
    demo.train_backbone(model, *data["train"], epochs=6)
    export_onnx(model, (torch.from_numpy(data["train"][0][:2]),), d / "digits.onnx", input_names=["input"],
                output_names=["logits"], exit_taps=model.exit_taps)
    hand = {"model": str(d / "digits.onnx"), "final": {"output": "logits"},
            "exits": [{"at": t, "head": {"kind": "linear"}, "gate": {"kind": "max_prob", "threshold": 0.99}}
                      for t in model.exit_taps]}
    (d / "hand.yaml").write_text(yaml.safe_dump(hand, sort_keys=False))
    return d


@pytest.mark.slow
def test_auto_places_exits_on_digits(digits: Path) -> None:
    from eecompile.auto import REPORT_FILE
    from eecompile.bundle import Bundle
    from eecompile.cli import cli
    from eecompile.runtimes.chain import EarlyExitRunner

    out = digits / "auto.eebundle"
    res = CliRunner().invoke(cli, [
        "auto", str(digits / "digits.onnx"), "--data", str(digits / "train.npz"), "--calib", str(digits / "cal.npz"),
        "--max-drop", "0.02", "-o", str(out), "--candidates", "4", "--max-exits", "2", "--epochs", "15",
        "--verify-top", "2", "--compare", str(digits / "hand.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    cands = [c["tensor"] for c in report["candidates"]]
    assert 2 <= len(cands) <= 4
    # Every subset of at most 2 candidates was scored; the verified ones are the best predicted.
    n = len(cands)
    assert len(report["ranking"]) == n + n * (n - 1) // 2
    assert [c["exits"] for c in report["verified"]] == [c["exits"] for c in report["ranking"][:2]]
    chosen = report["chosen"]
    assert set(chosen["exits"]) <= set(cands) and 1 <= len(chosen["exits"]) <= 2
    within = [c for c in report["verified"] if c["measured_drop"] <= 0.02 + 1e-12]
    if within:
        assert chosen["measured_drop"] <= 0.02 + 1e-12
        assert chosen["measured_speedup"] == max(c["measured_speedup"] for c in within)
    hand = report["hand_placed"]
    assert hand["exits"] == ["feat1", "feat2", "feat3"] and hand["measured_speedup"] > 0

    # The bundle: the chosen exits, calibrated thresholds, trained heads, engines for this machine, the report.
    b = Bundle.load(out)
    m = b.manifest
    assert [s.exit.at[0] for s in m.segments[:-1]] == chosen["exits"]
    assert m.calibration is not None and m.calibration["max_drop"] == 0.02
    assert [s.exit.gate.threshold for s in m.segments[:-1]] == pytest.approx(chosen["thresholds"])  # type: ignore[union-attr]
    assert REPORT_FILE in m.files
    assert json.loads((out / REPORT_FILE).read_text())["chosen"]["exits"] == chosen["exits"]
    runner = EarlyExitRunner(out)
    assert getattr(runner.backend, "engine_target", None) is not None
    with np.load(digits / "test.npz") as z:
        x, y = z["input"], z["labels"]
    r = runner.run({"input": x})
    assert r.exit_counts.sum() == len(y) and r.exit_counts[:-1].sum() > 0  # some digits leave early
    assert float((r.outputs["logits"].argmax(1) == y).mean()) > 0.8


def test_auto_refuses_bad_arguments(tmp_path: Path) -> None:
    from eecompile.auto import auto_bundle
    from eecompile.errors import CalibrationError, SpecError

    model = ROOT / "nothing.onnx"
    with pytest.raises(SpecError, match="head kind 'lin'"):
        auto_bundle(model, "t.npz", "c.npz", tmp_path / "o", max_drop=0.01, head="lin")
    with pytest.raises(CalibrationError, match="max-drop"):
        auto_bundle(model, "t.npz", "c.npz", tmp_path / "o", max_drop=1.5)
    with pytest.raises(SpecError, match="at least 1"):
        auto_bundle(model, "t.npz", "c.npz", tmp_path / "o", max_drop=0.01, max_exits=0)
