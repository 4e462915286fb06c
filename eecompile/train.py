"""Exit heads trained on frozen features, by self-distillation from the final exit (labels optional).

1. Features: the runner (:class:`~eecompile.runtimes.chain.EarlyExitRunner`, ONNX Runtime, policy ``never``)
   runs over the data batch by batch, with each trainable exit's cut tensor exposed as an extra output.
   Features, the final exit's logits and each exit's current predictions are cached once (a memory-mapped file
   in a temporary directory when large), so memory stays bounded whatever the data size.
2. Heads: each is the torch twin of its ONNX template (:func:`eecompile.heads.head_module`), trained with the
   backbone frozen (the features are fixed arrays). Loss: ``T^2 * KL(softmax(final / T) || softmax(head / T))``
   plus cross-entropy when the data has ``labels`` (and ``use_labels``). 10% of the samples are held out to
   report agreement with the final exit on data the head did not see.
3. Splice: the trained weights go into the same ONNX template (no ``torch.onnx.export``); the compiler's
   :func:`eecompile.replace_heads.replace_heads` splices them in, re-verifies and rewrites the bundle atomically.

torch is imported inside :func:`train_heads` only (the ``train`` extra).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle
from eecompile.calibrate.collect import final_output, iter_batches, load_data
from eecompile.errors import BundleError, EECompileError
from eecompile.heads import head_input_names, head_module, head_onnx, module_weights

log = logging.getLogger(__name__)

MEMMAP_BYTES = 256 << 20  # cache features on disk beyond this


@dataclass
class HeadResult:
    """One trained head: agreement with the final exit and accuracy (fractions in [0, 1]) before and after."""

    index: int
    name: str | None
    kind: str
    agree_before: float  # held-out agreement with the final exit, before / after training
    agree_after: float
    acc_before: float | None  # held-out accuracy against the labels (when there are labels)
    acc_after: float | None
    train_agree: float  # agreement on the training rows after training
    loss: float  # last epoch's mean loss


@dataclass
class TrainReport:
    """What :func:`train_heads` did: sample counts, settings, one :class:`HeadResult` per trained head, and the
    exits it skipped (heads it did not make) with why."""

    bundle: str
    n_train: int
    n_val: int
    epochs: int
    temperature: float
    used_labels: bool
    final_accuracy: float | None  # final exit on the held-out rows (labels only)
    heads: list[HeadResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for JSON)."""
        from dataclasses import asdict

        return asdict(self)

    def print(self) -> None:
        """A table of the heads on the terminal (needs rich, part of the CLI install)."""
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"exit heads trained ({self.n_train} samples, {self.epochs} epochs, T={self.temperature:g}, "
                        f"{'distillation + labels' if self.used_labels else 'distillation only'}); "
                        f"held-out: {self.n_val} samples")
        for col in ("exit", "head", "agreement w/ final before", "after", "accuracy before", "after", "train agreement"):
            t.add_column(col, justify="right")

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        for h in self.heads:
            t.add_row(str(h.name or h.index), h.kind, pct(h.agree_before), pct(h.agree_after), pct(h.acc_before),
                      pct(h.acc_after), pct(h.train_agree))
        c = Console()
        c.print(t)
        if self.final_accuracy is not None:
            c.print(f"final exit accuracy (held-out): {self.final_accuracy:.3f}")
        for s in self.skipped:
            c.print(f"skipped: {s}")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise EECompileError("train-heads needs PyTorch: pip install 'eecompile[train]'") from e
    return torch


class _Cache:
    """Arrays of N rows, allocated at the first batch: in memory, or memory-mapped when large."""

    def __init__(self, n: int, directory: Path) -> None:
        self.n = n
        self.dir = directory
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, key: str, rows: slice, value: np.ndarray) -> None:
        if key not in self.arrays:
            shape = (self.n, *value.shape[1:])
            nbytes = int(np.prod(shape)) * value.dtype.itemsize
            if nbytes > MEMMAP_BYTES:
                self.arrays[key] = np.lib.format.open_memmap(self.dir / f"{len(self.arrays)}.npy", mode="w+",
                                                             dtype=value.dtype, shape=shape)
            else:
                self.arrays[key] = np.empty(shape, value.dtype)
        self.arrays[key][rows] = value


def _class_last(x: np.ndarray, class_axis: int, n_classes: int) -> np.ndarray:
    """Logits as [N, P, C] (P positions per sample: 1 for a classifier, T for token outputs)."""
    x = np.moveaxis(x, class_axis if class_axis >= 0 else x.ndim + class_axis, -1)
    return x.reshape(x.shape[0], -1, n_classes)


def train_heads(bundle: str | Path | Bundle, data: str | Path, *, epochs: int = 30, use_labels: bool = True,
                temperature: float = 2.0, lr: float = 3e-3, batch_size: int = 64, seed: int = 0,
                val_fraction: float = 0.1, weight_decay: float = 1e-4, quiet: bool = False) -> TrainReport:
    """Train every exit head the spec asked eecompile to make (``head: {kind: ...}``) and splice it in.

    ``data``: an .npz with the model inputs (N samples along each input's batch axis) and optionally
    ``labels`` (int class indices, ``[N]`` or ``[N, P]`` for P predictions per sample). The backbone is frozen:
    the features each head reads (the tensors the exit is cut at) come from the bundle's own segments, run
    once over the data. Loss per head: ``T^2 * KL(softmax(final / T) || softmax(head / T))`` (self-distillation
    from the final exit: Hinton et al. 2015 for the T^2 scaling, FastBERT, Liu et al. 2020, for exits) plus
    cross-entropy on the labels when present and ``use_labels``. AdamW (``lr``, ``weight_decay``) with a cosine
    schedule over ``epochs`` of mini-batches of ``batch_size``; ``val_fraction`` of the samples (when N >= 20)
    is held out for the report. The trained weights are written into the head's ONNX template and the bundle
    is re-verified and rewritten atomically (:func:`eecompile.replace_heads.replace_heads`).

    Returns a :class:`TrainReport`. Raises EECompileError for non-positive settings or when torch is missing,
    BundleError when no exit has a head eecompile makes or an exit's cut does not list the tensors its head
    reads, DataError for unusable data, and EECompileError for labels that do not match the predictions.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or temperature <= 0:
        raise EECompileError(f"train-heads: epochs ({epochs}), batch ({batch_size}), lr ({lr}) and temperature "
                             f"({temperature}) must be positive")
    if not 0.0 <= val_fraction < 1.0:
        raise EECompileError(f"train-heads: val_fraction must be in [0, 1), got {val_fraction}")
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m = b.manifest
    trainable = [s for s in m.segments[:-1] if s.exit.head_spec and s.exit.head_spec.get("kind")]
    skipped = [f"exit {s.index} ({s.exit.head}): not a head eecompile makes" for s in m.segments[:-1]
               if s not in trainable]
    if not trainable:
        raise BundleError(
            f"{b.path}: no exit has a head to train; in the spec, give an exit `head: {{kind: linear}}` "
            f"(or mlp|conv|token) and recompile"
        )
    torch = _import_torch()
    inputs, labels = load_data(data, m)
    if not use_labels:
        labels = None
    n = next(iter(inputs.values())).shape[0]
    out_name = final_output(m)
    final_info = m.outputs[0]
    class_axis = m.class_axis if m.class_axis >= 0 else len(final_info.shape) + m.class_axis
    n_classes = final_info.shape[class_axis]
    if not isinstance(n_classes, int):
        raise BundleError(f"{b.path}: the final output '{out_name}' has no fixed class count; recompile the bundle")

    # ---- 1. features, cached once
    head_inputs: dict[int, list[str]] = {}
    for s in trainable:
        hs = s.exit.head_spec or {}
        n_in = len(head_input_names(hs["kind"], hs["feature_shape"], hs.get("options")))
        if len(s.exit.at) < n_in:
            raise BundleError(f"{b.path}: exit {s.index}'s head reads {n_in} tensors but the exit is cut at "
                              f"{s.exit.at}; list them all in the spec's `at`")
        # Batch-first views of time-major cut tensors where the compiler made them (heads read those).
        head_inputs[s.index] = list(hs.get("inputs") or s.exit.at)[:n_in]
    extra = {k: [t for t in names if t not in inputs] for k, names in head_inputs.items()}
    extra = {k: names for k, names in extra.items() if names}
    from eecompile.runtimes.chain import EarlyExitRunner

    # The runner itself, with every exit recorded (policy never) and the cut tensors exposed as extra outputs.
    runner = EarlyExitRunner(b, expose=extra)
    collect_batch = 256
    with tempfile.TemporaryDirectory(prefix="eecompile-features-") as tmp:
        cache = _Cache(n, Path(tmp))
        for rows in iter_batches(n, collect_batch, "computing features", quiet):
            feeds = {k: v[rows] for k, v in inputs.items()}
            res = runner.run(feeds, thresholds="never", policy="never", extra_outputs=extra)
            assert res.all_exits is not None
            cache.put("final", rows, res.all_exits[-1][out_name])
            for s in trainable:
                k = s.index
                for j, t in enumerate(head_inputs[k]):
                    cache.put(f"in{k}.{j}", rows, feeds[t] if t in feeds else res.extra[k][t])
                cache.put(f"before{k}", rows, res.all_exits[k][out_name])
        runner.close()
        arrays = cache.arrays
        teacher = _class_last(np.asarray(arrays["final"], np.float32), class_axis, n_classes)
        teacher_pred = teacher.argmax(-1)  # [N, P]
        lab = None if labels is None else np.asarray(labels).reshape(n, -1).astype(np.int64)
        if lab is not None and lab.shape[1] != teacher_pred.shape[1]:
            raise EECompileError(f"{data}: 'labels' has {lab.shape[1]} entries per sample, the model predicts "
                                 f"{teacher_pred.shape[1]}; give one class index per prediction")
        if lab is not None and (lab.min() < 0 or lab.max() >= n_classes):
            raise EECompileError(f"{data}: 'labels' must be class indices in [0, {n_classes}); got "
                                 f"[{lab.min()}, {lab.max()}]")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_val = int(round(val_fraction * n)) if n >= 20 else 0
        val, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        eval_rows = val if n_val else tr

        def agreement(pred: np.ndarray, rows: np.ndarray) -> float:
            return float((pred[rows] == teacher_pred[rows]).all(axis=1).mean())

        def accuracy(pred: np.ndarray, rows: np.ndarray) -> float | None:
            return None if lab is None else float((pred[rows] == lab[rows]).all(axis=1).mean())

        report = TrainReport(bundle=str(b.path), n_train=len(tr), n_val=n_val, epochs=epochs,
                             temperature=temperature, used_labels=lab is not None,
                             final_accuracy=accuracy(teacher_pred, eval_rows), skipped=skipped)
        t_soft = torch.softmax(torch.from_numpy(teacher) / temperature, dim=-1)
        t_lab = None if lab is None else torch.from_numpy(lab)
        new_heads = {}
        new_specs = {}
        for s in trainable:
            k = s.index
            hs = dict(s.exit.head_spec or {})
            feats = [arrays[f"in{k}.{j}"] for j in range(len(head_inputs[k]))]
            before = _class_last(np.asarray(arrays[f"before{k}"], np.float32), class_axis, n_classes).argmax(-1)
            torch.manual_seed(seed + k)
            module = head_module(hs["kind"], hs["feature_shape"], n_classes, hs.get("options"))
            loss = _fit(torch, module, feats, t_soft, t_lab, tr, epochs=epochs, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, temperature=temperature, seed=seed + k)
            after = _predict(torch, module, feats, n, n_classes)
            report.heads.append(HeadResult(
                index=k, name=s.exit.name, kind=hs["kind"], agree_before=agreement(before, eval_rows),
                agree_after=agreement(after, eval_rows), acc_before=accuracy(before, eval_rows),
                acc_after=accuracy(after, eval_rows), train_agree=agreement(after, tr), loss=loss))
            opset = _segment_opset(b, k)
            new_heads[k] = head_onnx(hs["kind"], hs["feature_shape"], n_classes, hs.get("options"),
                                     weights=module_weights(module), opset=opset)
            hs.update(trained=True, epochs=epochs, temperature=temperature, used_labels=lab is not None,
                      n_train=len(tr), held_out_agreement=report.heads[-1].agree_after)
            new_specs[k] = hs
    from eecompile.replace_heads import replace_heads

    replace_heads(b.path, new_heads, head_specs=new_specs)
    return report


def _segment_opset(bundle: Bundle, k: int) -> int:
    """The default-domain opset of segment k's ONNX file (the trained head is written at the same opset)."""
    import onnx

    model = onnx.load(str(bundle.verify_file(bundle.manifest.segments[k].file)), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _fit(torch: Any, module: Any, feats: list[np.ndarray], t_soft: Any, t_lab: Any, rows: np.ndarray, *,
         epochs: int, batch_size: int, lr: float, weight_decay: float, temperature: float, seed: int) -> float:
    """Train ``module`` on ``feats[rows]`` (Adam, cosine learning rate); returns the last epoch's mean loss."""
    import torch.nn.functional as F

    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(rows) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    rng = np.random.default_rng(seed)
    last = float("nan")
    for _ in range(epochs):
        order = rows[rng.permutation(len(rows))]
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start:start + batch_size])  # sorted: contiguous reads from a memmap
            xs = [torch.from_numpy(np.ascontiguousarray(f[idx])) for f in feats]
            logits = module(*xs)
            logits = logits.reshape(logits.shape[0], -1, logits.shape[-1])  # [b, P, C]
            c = logits.shape[-1]
            ti = torch.from_numpy(idx)
            log_p = F.log_softmax(logits / temperature, dim=-1).reshape(-1, c)
            # T^2 keeps the gradient scale of the soft targets comparable across temperatures (Hinton et al.).
            loss = F.kl_div(log_p, t_soft[ti].reshape(-1, c), reduction="batchmean") * temperature**2
            if t_lab is not None:
                loss = loss + F.cross_entropy(logits.reshape(-1, c), t_lab[ti].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    module.eval()
    return last


def _predict(torch: Any, module: Any, feats: list[np.ndarray], n: int, n_classes: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, n, 1024):
            xs = [torch.from_numpy(np.ascontiguousarray(f[start:start + 1024])) for f in feats]
            logits = module(*xs)
            out.append(logits.reshape(logits.shape[0], -1, n_classes).argmax(-1).numpy())
    return np.concatenate(out)
