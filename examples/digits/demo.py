"""`make demo`: early exits on real data (scikit-learn's handwritten digits, bundled, no download).

1. Train a small backbone in PyTorch (cheap early layers, a wide late part: most digits are easy).
2. Export it to ONNX with three exit taps named, write a spec with trained linear heads, compile.
3. Train the exit heads on frozen features (train split), calibrate for <= 1% accuracy drop (held-out split),
   then run on a third split: accuracy, share per exit, measured speedup against the unsplit model
   (ONNX Runtime CPU, batch 1, same run), oracle speedup. The plot goes to examples/digits/out/.

Run: .venv/bin/python examples/digits/demo.py [--epochs N] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

SPEC = """\
# Written by demo.py. Three early exits, each a linear head eecompile trains on the frozen features.
model: digits.onnx
exits:
  - at: feat1
    name: early
    head: {kind: linear}
    gate: {kind: max_prob, threshold: 0.99}
  - at: feat2
    name: middle
    head: {kind: linear}
    gate: {kind: max_prob, threshold: 0.99}
  - at: feat3
    name: late
    head: {kind: linear}
    gate: {kind: max_prob, threshold: 0.99}
final: {output: logits}
"""


def build_backbone(width: int = 1024):  # type: ignore[no-untyped-def]
    """Conv stem (cheap) -> taps feat1 [B, 512], feat2 [B, 256], feat3 [B, width] -> two wide layers -> logits.

    The late part holds ~60% of the compute, so an exit before it pays at batch 1; a cheap exit works on
    digits because most of them are already separable after the stem.
    """
    import torch
    from torch import nn

    class DigitsNet(nn.Module):
        exit_taps = ("feat1", "feat2", "feat3")

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
            self.mid = nn.Sequential(nn.Linear(512, 256), nn.ReLU())
            self.late = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
            self.top = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                     nn.Linear(width, 10))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            f1 = self.stem(x)
            f2 = self.mid(f1)
            f3 = self.late(f2)
            return self.top(f3), f1, f2, f3

    return DigitsNet()


def train_backbone(model, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> None:  # type: ignore[no-untyped-def]
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * max(1, len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // 64)):
            loss = F.cross_entropy(model(xt[idx])[0], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train 40% / calibration 30% / test 30%, stratified by digit."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8] in [0, 1]
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, train_size=0.4, stratify=y, random_state=seed)
    x_cal, x_te, y_cal, y_te = train_test_split(x_rest, y_rest, train_size=0.5, stratify=y_rest, random_state=seed)
    return {"train": (x_tr, y_tr), "cal": (x_cal, y_cal), "test": (x_te, y_te)}


def time_per_sample(fns, xs: np.ndarray, rounds: int = 15) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds per sample of each of ``fns``, feeding one sample at a time (batch 1): a pass over ``xs`` per call,
    the calls interleaved round by round and paired with the first (the unsplit model), medians over rounds
    (:func:`eecompile.calibrate.latency.time_interleaved`), so a busy machine moves both alike."""
    from eecompile.calibrate.latency import time_interleaved

    rows = [xs[i:i + 1] for i in range(len(xs))]

    def each(fn):  # type: ignore[no-untyped-def]
        return lambda: [fn(r) for r in rows]

    per_pass = time_interleaved([each(f) for f in fns], rounds=rounds, warmup=1, min_block_s=0.0,
                                budget_s=0.0, min_rounds=rounds, reference=0)
    return [t / len(rows) for t in per_pass]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=25, help="backbone epochs")
    ap.add_argument("--head-epochs", type=int, default=40)
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and timing blocks (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.head_epochs = 5, 10

    import onnxruntime as ort
    import torch

    import eecompile
    from eecompile.calibrate import calibrate_bundle, collect_exit_table, oracle_exits, session_options
    from eecompile.models.export import export_onnx
    from eecompile.runtimes.onnxruntime import default_threads
    from eecompile.train import train_heads

    torch.set_num_threads(default_threads())
    OUT.mkdir(parents=True, exist_ok=True)
    data = splits()
    for name, (x, y) in data.items():
        np.savez(OUT / f"{name}.npz", input=x, labels=y)
    print(f"digits: {', '.join(f'{k} {len(v[1])}' for k, v in data.items())} samples")

    # 1. backbone (seeded before it is built: the initial weights decide how well it trains)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_backbone()
    train_backbone(model, *data["train"], epochs=args.epochs)
    print(f"backbone trained in {time.perf_counter() - t0:.1f} s")
    onnx_path = export_onnx(model, (torch.from_numpy(data["train"][0][:2]),), OUT / "digits.onnx",
                            input_names=["input"], output_names=["logits"], exit_taps=model.exit_taps)

    # 2. compile
    spec = OUT / "spec.yaml"
    spec.write_text(SPEC)
    bundle_path = OUT / "digits.eebundle"
    bundle = eecompile.compile_model(spec, bundle_path, force=True)
    print(f"compiled {bundle_path.name}: {len(bundle.manifest.segments)} segments")

    # 3. heads on frozen features (train split), then thresholds for the budget (calibration split)
    train_heads(bundle_path, OUT / "train.npz", epochs=args.head_epochs, quiet=True).print()
    plot = OUT / "pareto.png"
    report = calibrate_bundle(bundle_path, OUT / "cal.npz", max_drop=args.max_drop, method="search", batch_size=1,
                              plot=plot, reference_model=onnx_path, quiet=True,
                              repeats=50 if args.quick else 200)
    report.print()
    if not report.deployed:
        print(f"calibration could not meet the budget at confidence {report.confidence:g} with "
              f"{report.n_samples} samples; nothing deployed")
        return 1

    # 4. the test split: accuracy, exits, and measured time against the unsplit model in the same run
    x_te, y_te = data["test"]
    full = ort.InferenceSession(str(onnx_path), session_options(default_threads()), providers=["CPUExecutionProvider"])
    full_logits = full.run(["logits"], {"input": x_te})[0]
    runner = eecompile.load(bundle_path, backend="onnxruntime")
    res = runner.run({"input": x_te})
    acc_full = float((full_logits.argmax(1) == y_te).mean())
    acc_ee = float((res.outputs["logits"].argmax(1) == y_te).mean())
    shares = res.exit_counts / res.exit_counts.sum()
    t_full, t_ee = time_per_sample([lambda x: full.run(["logits"], {"input": x}), lambda x: runner.run({"input": x})],
                                   x_te, rounds=5 if args.quick else 15)
    table = collect_exit_table(eecompile.Bundle.load(bundle_path), {"input": x_te}, y_te, quiet=True)
    cum = np.asarray([e["cumulative_ms"] for e in report.exits])
    oracle = report.baseline_ms / float(cum[oracle_exits(table)].mean())

    names = [str(e["name"] or (e["index"] if e["gate"] else "final")) for e in report.exits]
    print()
    print(f"test split ({len(y_te)} digits), ONNX Runtime CPU, batch 1, {default_threads()} threads")
    print(f"  accuracy: full model {acc_full:.4f}, early-exit chain {acc_ee:.4f} (drop {acc_full - acc_ee:+.4f}, "
          f"budget {args.max_drop})")
    print("  share exiting: " + ", ".join(f"{n} {s:.1%}" for n, s in zip(names, shares, strict=True)))
    print(f"  time per sample: unsplit model {t_full * 1e6:.1f} us, early-exit chain {t_ee * 1e6:.1f} us")
    model = f", its cost model {report.model_speedup:.2f}x" if report.measured else ""
    print(f"  measured speedup: {t_full / t_ee:.2f}x (calibration measured {report.expected_speedup:.2f}x on its own "
          f"split{model}; oracle {oracle:.2f}x)")
    print(f"  plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
