"""`eecompile auto` on the digits demo's model against the demo's hand-placed exits (``examples/digits``).

The demo's backbone is trained (same recipe and seed as ``make demo``) and exported with its three taps; the
hand-placed configuration is the demo's spec (linear heads at ``feat1``, ``feat2``, ``feat3``). ``auto`` gets the
same training and calibration splits and the same budget; both go through the same head training and calibration
(``--compare``), so the measured speedups (calibrate's, on this machine, batch 1) compare placements only.
Full mode only (it trains a backbone).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def auto_digits(ctx: Any) -> dict[str, Any]:
    """Exits placed by ``auto`` vs the demo's hand-placed ones, on digits at a 1% budget."""
    if ctx.quick:
        return {"measured": False, "reason": "full mode only (trains the digits backbone)"}
    import torch
    import yaml

    from eecompile.auto import auto_bundle
    from eecompile.models.export import export_onnx

    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    d = ctx.cache / "auto-digits"
    d.mkdir(parents=True, exist_ok=True)
    data = demo.splits()
    for name, (x, y) in data.items():
        np.savez(d / f"{name}.npz", input=x, labels=y)
    model_path = d / "digits.onnx"
    if not model_path.is_file():
        ctx.say("auto: training the digits backbone")
        torch.manual_seed(0)
        model = demo.build_backbone()
        demo.train_backbone(model, *data["train"], epochs=25)
        export_onnx(model, (torch.from_numpy(data["train"][0][:2]),), model_path, input_names=["input"],
                    output_names=["logits"], exit_taps=model.exit_taps)
    hand = yaml.safe_load(demo.SPEC)
    hand["model"] = str(model_path)
    (d / "hand.yaml").write_text(yaml.safe_dump(hand, sort_keys=False))
    ctx.say("auto: placing exits on digits")
    report = auto_bundle(model_path, d / "train.npz", d / "cal.npz", d / "auto.eebundle", max_drop=0.01,
                         candidates=6, max_exits=3, epochs=40, compare=d / "hand.yaml", force=True, quiet=True,
                         repeats=100)
    out = report.to_dict()
    # The test split, which neither placement saw: accuracy and exits of the bundle auto wrote.
    from eecompile.runtimes.chain import EarlyExitRunner

    with np.load(d / "test.npz") as z:
        x, y = z["input"], z["labels"]
    r = EarlyExitRunner(d / "auto.eebundle").run({"input": x})
    out["test"] = {"samples": int(len(y)), "accuracy": float((r.outputs["logits"].argmax(1) == y).mean()),
                   "exit_shares": [float(c) / len(y) for c in r.exit_counts]}
    return out
