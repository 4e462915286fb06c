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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle
from eecompile.calibrate.collect import final_output, iter_batches, load_data
from eecompile.errors import BundleError, EECompileError
from eecompile.halting import DEFAULT_BETA, DEFAULT_HAZARD, check_halting, geometric_prior, palbert_loss
from eecompile.heads import head_input_names, head_module, head_onnx, module_weights
from eecompile.runtimes.data import batch_size_of, take_samples

log = logging.getLogger(__name__)

MIN_HELD_OUT_SAMPLES = 20  # below this many samples, train-heads holds none out (all train the heads)

MEMMAP_BYTES = 256 << 20  # cache features on disk beyond this


@dataclass
class HeadResult:
    """One trained head: agreement with the final exit and accuracy (fractions in [0, 1]) before and after; for
    regression exits the mean relative L2 error to the final output instead; and how well its score (if any)
    predicts its target on held-out rows. The held-out figures are None when no sample was held out."""

    index: int
    name: str | None
    kind: str
    agree_before: float | None  # held-out agreement with the final exit, before / after training (classification)
    agree_after: float | None
    acc_before: float | None  # held-out accuracy against the labels (when there are labels)
    acc_after: float | None
    train_agree: float | None  # agreement on the training rows after training (classification)
    loss: float  # last epoch's mean loss
    error_before: float | None = None  # regression: held-out mean relative L2 error to the final output
    error_after: float | None = None
    score: str | None = None  # the head's score option (uncertainty | agreement | halting), when it has one
    # Held-out loss of the score: MSE to tanh(error), cross-entropy to agreement, or (halting) PALBERT's objective
    # over every halting exit (the same figure on each); and the same loss of a constant score (the target's mean;
    # halting: the prior's hazard at every exit), for comparison.
    score_loss: float | None = None
    score_baseline: float | None = None


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
    task: str = "classification"  # regression: heads distilled with MSE to the final output

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for JSON)."""
        from dataclasses import asdict

        return asdict(self)

    def print(self) -> None:
        """A table of the heads on the terminal (needs rich, part of the CLI install)."""
        from rich.table import Table

        from eecompile.console import report_console

        regression = self.task == "regression"
        how = ("MSE to the final output" if regression else
               f"T={self.temperature:g}, {'distillation + labels' if self.used_labels else 'distillation only'}")
        t = Table(title=f"exit heads trained ({self.n_train} samples, {self.epochs} epochs, {how}); "
                        + (f"held-out: {self.n_val} samples" if self.n_val else "no held-out samples"))
        cols = (("exit", "head", "rel. L2 error to final before", "after") if regression else
                ("exit", "head", "agreement w/ final before", "after", "accuracy before", "after", "train agreement"))
        for col in (*cols, "score", "score loss (constant)"):
            t.add_column(col, justify="right")

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        for h in self.heads:
            score = [h.score or "-", "-" if h.score_loss is None or h.score_baseline is None
                     else f"{h.score_loss:.4f} ({h.score_baseline:.4f})"]
            if regression:
                t.add_row(str(h.name or h.index), h.kind, pct(h.error_before), pct(h.error_after), *score)
            else:
                t.add_row(str(h.name or h.index), h.kind, pct(h.agree_before), pct(h.agree_after), pct(h.acc_before),
                          pct(h.acc_after), pct(h.train_agree), *score)
        c = report_console()
        c.print(t)
        if self.final_accuracy is not None:
            c.print(f"final exit accuracy (held-out): {self.final_accuracy:.3f}")
        if not self.n_val:
            c.print(f"note: no samples were held out (train-heads holds out val_fraction of the data from "
                    f"{MIN_HELD_OUT_SAMPLES} samples on): the held-out columns show -"
                    + ("" if self.task == "regression" else "; train agreement is measured on the training samples"))
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
                val_fraction: float = 0.1, weight_decay: float = 1e-4, quiet: bool = False,
                head_files: bool = True, halting_beta: float | None = None,
                halting_prior: float | None = None) -> TrainReport:
    """Train every exit head the spec asked eecompile to make (``head: {kind: ...}``) and, with ``head_files``,
    every head given as an ONNX file (``head: FILE``: its float initializers trained in place, the graph run in
    torch by :mod:`eecompile.onnx_torch`), and splice them in. In-model heads (``head: {output: ...}``) are the
    model's and are left alone.

    ``data``: an .npz with the model inputs (N samples along each input's batch axis) and optionally
    ``labels`` (int class indices, ``[N]`` or ``[N, P]`` for P predictions per sample). The backbone is frozen:
    the features each head reads (the tensors the exit is cut at) come from the bundle's own segments, run
    once over the data. Loss per head: ``T^2 * KL(softmax(final / T) || softmax(head / T))`` (self-distillation
    from the final exit: Hinton et al. 2015 for the T^2 scaling, FastBERT, Liu et al. 2020, for exits) plus
    cross-entropy on the labels when present and ``use_labels``. AdamW (``lr``, ``weight_decay``) with a cosine
    schedule over ``epochs`` of mini-batches of ``batch_size``; ``val_fraction`` of the samples (when N >= 20)
    is held out for the report (with none held out, its held-out figures are None). The trained weights are written into the head's ONNX template (a head file:
    into a copy of the file's graph, same nodes and names) and the bundle is re-verified and rewritten
    atomically (:func:`eecompile.replace_heads.replace_heads`).

    Regression bundles (``manifest.task``): the loss is the MSE to the final output and the report gives the
    relative L2 error. A template's ``score`` option is fitted afterwards with the head frozen (see
    :func:`_fit_score`), except ``score: halting`` (PALBERT's lambda on q_exit gates): the lambdas of all such exits
    are trained together, in one optimiser, with PALBERT's objective (expected exit loss under the halting
    distribution plus ``halting_beta`` (None: 0.1) times its KL to a geometric prior of hazard ``halting_prior``
    (None: 0.5);
    :mod:`eecompile.halting`), each exit's loss being its trained head's distillation (+ label) loss and the final
    exit's its cross-entropy with the labels (0 without). A head file with two outputs trains the one shaped like
    the exit output (the other is its score, left as it is).

    Returns a :class:`TrainReport`. Raises EECompileError for non-positive settings, a ``val_fraction`` that
    leaves no sample to train on, ``halting_beta``/``halting_prior`` given for a bundle without halting heads, or
    when torch is missing,
    BundleError when no exit has a head eecompile makes or an exit's cut does not list the tensors its head
    reads, DataError for unusable data, and EECompileError for labels that do not match the predictions.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or temperature <= 0:
        raise EECompileError(f"train-heads: epochs ({epochs}), batch ({batch_size}), lr ({lr}) and temperature "
                             f"({temperature}) must be positive")
    if not 0.0 <= val_fraction < 1.0:
        raise EECompileError(f"train-heads: val_fraction must be in [0, 1), got {val_fraction}")
    beta = DEFAULT_BETA if halting_beta is None else halting_beta
    hazard = DEFAULT_HAZARD if halting_prior is None else halting_prior
    check_halting(beta, hazard)
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m = b.manifest
    trainable = [s for s in m.segments[:-1] if s.exit.head_spec and s.exit.head_spec.get("kind")]
    files: dict[int, Any] = {}
    for s in m.segments[:-1]:
        if head_files and s.exit.head.startswith("file:") and f"heads/exit{s.index}.onnx" in m.files:
            files[s.index] = _load_head_file(b, s.index)
            trainable.append(s)
    trainable.sort(key=lambda s: s.index)
    skipped = [f"exit {s.index} ({s.exit.head}): " + ("a head file, kept as it is (head_files=False)"
                                                      if s.exit.head.startswith("file:") else "the model's own head")
               for s in m.segments[:-1] if s not in trainable]
    if not trainable:
        raise BundleError(
            f"{b.path}: no exit has a head to train; in the spec, give an exit `head: {{kind: linear}}` "
            f"(or mlp|conv|token|local|global) or a head file, and recompile"
        )
    halting_options = [f"--halting-{name} {v:g}" for name, v in (("beta", halting_beta), ("prior", halting_prior))
                       if v is not None]
    if halting_options and not _halting_exits(trainable):
        raise EECompileError(f"train-heads {' and '.join(halting_options)}: only for halting heads (PALBERT's lambda: "
                             f"an exit `head: {{kind: linear, options: {{score: halting}}}}` on a q_exit gate); "
                             f"{b.path} has none, so nothing would use {'it' if len(halting_options) == 1 else 'them'}: "
                             f"leave {'it' if len(halting_options) == 1 else 'them'} out")
    torch = _import_torch()
    inputs, labels = load_data(data, m)
    if not use_labels:
        labels = None
    axes = {t.name: t.batch_axis for t in m.inputs}  # a time-major [T, B, F] input has its samples on axis 1
    n = batch_size_of(inputs, m.inputs, str(data))
    out_name = final_output(m)
    final_info = m.outputs[0]
    regression = m.task == "regression"
    n_classes: int = 0
    out_axis = final_info.batch_axis or 0
    class_axis = 0
    if not regression:
        class_axis = m.class_axis if m.class_axis >= 0 else len(final_info.shape) + m.class_axis
        c = final_info.shape[class_axis]
        if not isinstance(c, int):
            raise BundleError(f"{b.path}: the final output '{out_name}' has no fixed class count; recompile the bundle")
        n_classes = c
        if class_axis < out_axis:  # the cached outputs are batch first
            class_axis += 1

    # ---- 1. features, cached once
    head_inputs: dict[int, list[str]] = {}
    for s in trainable:
        hs = s.exit.head_spec or {}
        n_in = (len(files[s.index].inputs) if s.index in files
                else len(head_input_names(hs["kind"], hs["feature_shape"], hs.get("options"))))
        if len(s.exit.at) < n_in:
            raise BundleError(f"{b.path}: exit {s.index}'s head reads {n_in} tensors but the exit is cut at "
                              f"{s.exit.at}; list them all in the spec's `at`")
        # Batch-first views of time-major cut tensors where the compiler made them (heads read those).
        views = hs.get("inputs") or (_view_names(b, s.index, list(s.exit.at)) if s.index in files else s.exit.at)
        head_inputs[s.index] = list(views)[:n_in]
    extra = {k: [t for t in names if t not in inputs] for k, names in head_inputs.items()}
    extra = {k: names for k, names in extra.items() if names}
    from eecompile.runtimes.chain import EarlyExitRunner

    # The runner itself, with every exit recorded (policy never) and the cut tensors exposed as extra outputs. A loop
    # bundle's heads are trained on one step's chain: the data holds its inputs, per-step ones included (x and t).
    chain = b if m.loop is None else Bundle(b.path, replace(m, loop=None))
    runner = EarlyExitRunner(chain, expose=extra)
    collect_batch = 256
    with tempfile.TemporaryDirectory(prefix="eecompile-features-") as tmp:
        cache = _Cache(n, Path(tmp))
        for rows in iter_batches(n, collect_batch, "computing features", quiet):
            feeds = {k: take_samples(v, rows, axes.get(k)) for k, v in inputs.items()}
            res = runner.run(feeds, thresholds="never", policy="never", extra_outputs=extra)
            assert res.all_exits is not None
            cache.put("final", rows, np.moveaxis(res.all_exits[-1][out_name], out_axis, 0))
            for s in trainable:
                k = s.index
                for j, t in enumerate(head_inputs[k]):
                    cache.put(f"in{k}.{j}", rows, np.moveaxis(feeds[t], axes[t] or 0, 0) if t in feeds
                              else res.extra[k][t])
                cache.put(f"before{k}", rows, np.moveaxis(res.all_exits[k][out_name], out_axis, 0))
        runner.close()
        arrays = cache.arrays
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_val = int(round(val_fraction * n)) if n >= MIN_HELD_OUT_SAMPLES else 0
        if n_val >= n:
            raise EECompileError(f"train-heads: val_fraction {val_fraction} holds out all {n} samples and leaves "
                                 f"none to train on; lower it")
        # No held-out rows (small data): the held-out figures stay None ("-"), not numbers of the training rows.
        val, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        target: Any
        if regression:
            target = _Regression(torch, np.asarray(arrays["final"], np.float32).reshape(n, -1))
        else:
            target = _Classes(torch, np.asarray(arrays["final"], np.float32), class_axis, n_classes, labels, data,
                              temperature)
        report = TrainReport(bundle=str(b.path), n_train=len(tr), n_val=n_val, epochs=epochs,
                             temperature=temperature, used_labels=target.lab is not None,
                             final_accuracy=target.accuracy(target.teacher_pred, val) if n_val else None,
                             skipped=skipped,
                             task=m.task)
        new_heads = {}
        new_specs = {}
        score_outputs: dict[int, str] = {}
        done: list[tuple[Any, ...]] = []  # trained heads, written once every score is fitted
        halting: list[tuple[Any, ...]] = []  # (module, features, per-sample losses, result): PALBERT's lambdas
        _check_halting_run(b, trainable)
        for s in trainable:
            k = s.index
            feats = [arrays[f"in{k}.{j}"] for j in range(len(head_inputs[k]))]
            torch.manual_seed(seed + k)
            if k in files:  # a head file: its own graph, run in torch, its float weights trained
                hs = {"file": s.exit.head.split(":", 1)[1]}
                opts: dict[str, Any] = {}
                nc, out_shape = 0, None
                module = files[k].module
                per_sample = int(np.prod(arrays["final"].shape[1:]))
                forward = files[k].forward(per_sample)
                main = list(module.parameters())
                if files[k].score is not None:
                    score_outputs[k] = files[k].score
            else:
                hs = dict(s.exit.head_spec or {})
                nc = int(hs["n_classes"]) if regression else n_classes
                out_shape = hs.get("out_shape")
                opts = dict(hs.get("options") or {})
                module = head_module(hs["kind"], hs["feature_shape"], nc, opts, out_shape=out_shape)
                main = [p for name, p in module.named_parameters() if not name.startswith("score_layer.")]
                forward = None
            loss = _fit(torch, module, main, feats, tr, target.loss, epochs=epochs, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, seed=seed + k, forward=forward)
            before = target.summary(np.asarray(arrays[f"before{k}"], np.float32))
            after_out = _predict(torch, module, feats, n, forward)
            after = target.summary(after_out, head=True)
            result = HeadResult(index=k, name=s.exit.name, kind=hs.get("kind", "file"), agree_before=None,
                                agree_after=None,
                                acc_before=None, acc_after=None, train_agree=None, loss=loss)
            if regression and n_val:
                result.error_before = float(before[val].mean())
                result.error_after = float(after[val].mean())
            elif not regression:
                if n_val:
                    result.agree_before, result.agree_after = target.agreement(before, val), target.agreement(after, val)
                    result.acc_before, result.acc_after = target.accuracy(before, val), target.accuracy(after, val)
                result.train_agree = target.agreement(after, tr)
            if opts.get("score") == "halting":  # PALBERT's lambda: fitted below, jointly over the exits
                result.score = "halting"
                halting.append((module, feats, target.sample_losses(after_out), result))
            elif opts.get("score"):  # the score head, fitted after the exit head, the exit head frozen
                result.score = opts["score"]
                result.score_loss, result.score_baseline = _fit_score(
                    torch, module, feats, target.score_target(after), tr, val, opts["score"], epochs=epochs,
                    batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed + k)
            report.heads.append(result)
            done.append((s, module, hs, opts, nc, out_shape, result))
        if halting:
            losses = np.stack([h[2] for h in halting] + [target.sample_losses(None)], axis=1)
            held, baseline = _fit_halting(torch, [(h[0], h[1]) for h in halting], losses, tr, val,
                                          beta=beta, hazard=hazard, epochs=epochs,
                                          batch_size=batch_size, lr=lr, seed=seed)
            for h in halting:
                h[3].score_loss, h[3].score_baseline = held, baseline
        for s, module, hs, opts, nc, out_shape, result in done:
            k = s.index
            if k in files:
                new_heads[k] = module.trained_model()
            else:
                new_heads[k] = head_onnx(hs["kind"], hs["feature_shape"], nc, opts, weights=module_weights(module),
                                         opset=_segment_opset(b, k), out_shape=out_shape)
            hs.update(trained=True, epochs=epochs, temperature=temperature, used_labels=target.lab is not None,
                      n_train=len(tr))
            if regression and result.error_after is not None:
                hs["held_out_error"] = result.error_after
            elif result.agree_after is not None:
                hs["held_out_agreement"] = result.agree_after
            if result.score_loss is not None:
                hs["held_out_score_loss"] = result.score_loss
            new_specs[k] = hs
    from eecompile.replace_heads import replace_heads

    replace_heads(b.path, new_heads, head_specs=new_specs, score_outputs=score_outputs)
    return report


@dataclass
class _HeadFile:
    """A head file of the bundle (``heads/exit{k}.onnx``) as a trainable torch module; ``inputs``: its graph
    inputs (the exit's ``at`` tensors, in order); ``score``: the name of its score output, if it has two."""

    module: Any
    inputs: list[str]
    outputs: list[str]
    shapes: list[list[Any]]
    score: str | None = None

    def forward(self, per_sample: int) -> Any:
        """``forward(module, xs)`` giving the output the exit stands in for: the only one, or of two the one
        with ``per_sample`` values per sample (the other is the score)."""
        index = 0
        if len(self.outputs) == 2:
            sizes = [int(np.prod([d for d in s[1:] if isinstance(d, int)] or [1])) for s in self.shapes]
            index = 1 if sizes[1] == per_sample and sizes[0] != per_sample else 0
            self.score = self.outputs[1 - index]
        return lambda module, xs: module(*xs)[index]


def _view_names(bundle: Bundle, k: int, at: list[str]) -> list[str]:
    """What exit ``k``'s head file reads for each ``at`` tensor: the tensor itself, or the compiler's batch-first
    view ``ee{k}.head_in.{i}`` where segment ``k`` has one (a time-major cut; passes/attach_heads.py case 6)."""
    import onnx

    from eecompile.names import head_input

    model = onnx.load(str(bundle.verify_file(bundle.manifest.segments[k].file)), load_external_data=False)
    made = {o for n in model.graph.node for o in n.output}
    return [head_input(k, i) if head_input(k, i) in made else t for i, t in enumerate(at)]


def _load_head_file(bundle: Bundle, k: int) -> _HeadFile:
    import onnx

    from eecompile.onnx_torch import OnnxModule

    proto = onnx.load(str(bundle.verify_file(f"heads/exit{k}.onnx")))
    module = OnnxModule(proto, f"exits[{k}].head")
    shapes = [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in o.type.tensor_type.shape.dim]
              for o in proto.graph.output]
    return _HeadFile(module, list(module.inputs), list(module.outputs), shapes)


class _Classes:
    """Distillation targets of a classifier: the final exit's logits as [N, P, C] (P predictions per sample),
    its argmax, the labels; the KD + cross-entropy loss; agreement and accuracy of predictions [N, P]."""

    def __init__(self, torch: Any, final: np.ndarray, class_axis: int, n_classes: int, labels: np.ndarray | None,
                 data: Any, temperature: float) -> None:
        n = final.shape[0]
        self.n_classes, self.class_axis, self.temperature = n_classes, class_axis, temperature
        teacher = _class_last(final, class_axis, n_classes)
        self.teacher_pred = teacher.argmax(-1)  # [N, P]
        self.teacher_logits = np.ascontiguousarray(teacher, np.float32)
        lab = None if labels is None else np.asarray(labels).reshape(n, -1).astype(np.int64)
        if lab is not None and lab.shape[1] != self.teacher_pred.shape[1]:
            raise EECompileError(f"{data}: 'labels' has {lab.shape[1]} entries per sample, the model predicts "
                                 f"{self.teacher_pred.shape[1]}; give one class index per prediction")
        if lab is not None and (lab.min() < 0 or lab.max() >= n_classes):
            raise EECompileError(f"{data}: 'labels' must be class indices in [0, {n_classes}); got "
                                 f"[{lab.min()}, {lab.max()}]")
        self.lab = lab
        self.torch = torch
        self.t_soft = torch.softmax(torch.from_numpy(teacher) / temperature, dim=-1)
        self.t_lab = None if lab is None else torch.from_numpy(lab)

    def loss(self, out: Any, ti: Any) -> Any:
        """``T^2 * KL(softmax(final / T) || softmax(head / T))`` (+ cross-entropy on the labels) of a batch."""
        import torch.nn.functional as F

        logits = out.reshape(out.shape[0], -1, self.n_classes)  # [b, P, C]
        c, t = logits.shape[-1], self.temperature
        log_p = F.log_softmax(logits / t, dim=-1).reshape(-1, c)
        # T^2 keeps the gradient scale of the soft targets comparable across temperatures (Hinton et al.).
        loss = F.kl_div(log_p, self.t_soft[ti].reshape(-1, c), reduction="batchmean") * t**2
        if self.t_lab is not None:
            loss = loss + F.cross_entropy(logits.reshape(-1, c), self.t_lab[ti].reshape(-1))
        return loss

    def summary(self, out: np.ndarray, head: bool = False) -> np.ndarray:
        """Predictions [N, P]: of an exit's outputs (the final output's layout), or of a head's logits
        (``head``: [N, C] or [N, T, C])."""
        if head:
            return out.reshape(out.shape[0], -1, self.n_classes).argmax(-1)
        return _class_last(out, self.class_axis, self.n_classes).argmax(-1)

    def agreement(self, pred: np.ndarray, rows: np.ndarray) -> float:
        return float((pred[rows] == self.teacher_pred[rows]).all(axis=1).mean())

    def accuracy(self, pred: np.ndarray, rows: np.ndarray) -> float | None:
        return None if self.lab is None else float((pred[rows] == self.lab[rows]).all(axis=1).mean())

    def sample_losses(self, out: np.ndarray | None) -> np.ndarray:
        """Per sample [N] (mean over its P predictions): a head's ``T^2 KL`` to the final exit (+ cross-entropy on
        the labels), as :meth:`loss`; ``out`` None: the final exit's own loss (its cross-entropy, 0 without labels)."""
        import torch.nn.functional as F

        torch = self.torch
        n, c, t = self.t_soft.shape[0], self.n_classes, self.temperature
        total = torch.zeros(n)
        with torch.no_grad():
            if out is not None:
                logits = torch.from_numpy(np.asarray(out, np.float32)).reshape(n, -1, c)
                log_p = F.log_softmax(logits / t, dim=-1)
                kl = (self.t_soft * (torch.log(self.t_soft.clamp_min(1e-12)) - log_p)).sum(-1)
                total = kl.mean(1) * t**2
            else:
                logits = torch.from_numpy(self.teacher_logits)
            if self.t_lab is not None:
                ce = F.cross_entropy(logits.reshape(-1, c), self.t_lab.reshape(-1), reduction="none")
                total = total + ce.reshape(n, -1).mean(1)
        return total.numpy().astype(np.float64)

    def score_target(self, pred: np.ndarray) -> np.ndarray:
        """``score: agreement``: 1 where the exit's argmax equals the final exit's (every position), else 0."""
        return (pred == self.teacher_pred).all(axis=1).astype(np.float32)


class _Regression:
    """Distillation targets of a regression output: the final output flat per sample [N, F]; MSE; the relative
    L2 error ``||y_k - y|| / max(||y||, 1e-12)`` per sample (the error calibrate's ``--error-budget`` bounds)."""

    lab = None
    teacher_pred = None

    def __init__(self, torch: Any, final: np.ndarray) -> None:
        self.final = final
        self.t_final = torch.from_numpy(final)
        self.norm = np.maximum(np.linalg.norm(final, axis=1), 1e-12)

    def loss(self, out: Any, ti: Any) -> Any:
        import torch.nn.functional as F

        return F.mse_loss(out.reshape(out.shape[0], -1), self.t_final[ti])

    def summary(self, out: np.ndarray, head: bool = False) -> np.ndarray:
        """Relative L2 error to the final output per sample [N] (an exit's output or a head's, flat alike)."""
        return np.linalg.norm(out.reshape(out.shape[0], -1) - self.final, axis=1) / self.norm

    def accuracy(self, pred: Any, rows: np.ndarray) -> float | None:
        return None

    def score_target(self, err: np.ndarray) -> np.ndarray:
        """``score: uncertainty``: DeeDiff's pseudo uncertainty, tanh of the exit's error (here the relative L2
        error, so the target does not depend on the output's scale); the score is 1 - that."""
        return (1.0 - np.tanh(err)).astype(np.float32)


def _segment_opset(bundle: Bundle, k: int) -> int:
    """The default-domain opset of segment k's ONNX file (the trained head is written at the same opset)."""
    import onnx

    model = onnx.load(str(bundle.verify_file(bundle.manifest.segments[k].file)), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _fit(torch: Any, module: Any, params: list[Any], feats: list[np.ndarray], rows: np.ndarray, loss_of: Any, *,
         epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
         forward: Any = None) -> float:
    """Train ``params`` of ``module`` on ``feats[rows]`` (AdamW, cosine learning rate) to minimise
    ``loss_of(forward(module, xs), row_indices)``; returns the last epoch's mean loss."""
    module.train()
    forward = forward or (lambda mod, xs: mod(*xs))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
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
            loss = loss_of(forward(module, xs), torch.from_numpy(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    module.eval()
    return last


def _fit_score(torch: Any, module: Any, feats: list[np.ndarray], target: np.ndarray, rows: np.ndarray,
               eval_rows: np.ndarray, kind: str, **fit: Any) -> tuple[float | None, float | None]:
    """Fit the score layer of ``module`` (the rest frozen) to ``target`` [N]: ``uncertainty`` by MSE of the
    predicted uncertainty (DeeDiff's L_u), ``agreement`` by binary cross-entropy (JEI-DNN, BERxiT). Returns the
    loss on ``eval_rows`` (the held-out rows) and that of a constant score equal to the training target's mean;
    both None when ``eval_rows`` is empty."""
    import torch.nn.functional as F

    t = torch.from_numpy(target.astype(np.float32))

    def loss_of(score: Any, ti: Any) -> Any:
        s = score.reshape(-1)
        if kind == "agreement":
            return F.binary_cross_entropy(s.clamp(1e-6, 1 - 1e-6), t[ti])
        return F.mse_loss(s, t[ti])

    # Start from the constant score that fits the target's mean (the untrained bias saturates the sigmoid).
    mean = float(np.clip(target[rows].mean(), 1e-3, 1 - 1e-3))
    params = _start_constant(torch, module, 1.0 - mean if kind == "uncertainty" else mean)  # uncertainty = 1 - score
    _fit_score_layers(torch, module, params, feats, rows, loss_of, forward=lambda mod, xs: mod.score(*xs), **fit)
    if not len(eval_rows):
        return None, None
    got = _on_rows(torch, lambda *xs: module.score(*xs).reshape(-1), feats, eval_rows)
    want = target[eval_rows]
    const = np.full_like(want, float(target[rows].mean()))

    def held(pred: np.ndarray) -> float:
        if kind == "agreement":
            p = np.clip(pred, 1e-6, 1 - 1e-6)
            return float(-(want * np.log(p) + (1 - want) * np.log(1 - p)).mean())
        return float(((pred - want) ** 2).mean())

    return held(got), held(const)


def _start_constant(torch: Any, module: Any, value: float) -> list[Any]:
    """Set ``module``'s score layer to the constant sigmoid ``value`` (zero weights, the bias its logit); return
    that layer's parameters."""
    with torch.no_grad():
        module.score_layer.weight.zero_()
        module.score_layer.bias.fill_(math.log(value / (1.0 - value)))
    return list(module.score_layer.parameters())


def _fit_score_layers(torch: Any, module: Any, params: list[Any], feats: list[np.ndarray], rows: np.ndarray,
                      loss_of: Any, **fit: Any) -> float:
    """:func:`_fit` of the score layers ``params`` only (the rest of ``module`` frozen): one linear layer each (a
    logistic regression on the pooled features and softmax statistics), so a learning rate 10x the heads' and no
    weight decay, for its weights to reach the scale the statistics need."""
    frozen = [p for p in module.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _fit(torch, module, params, feats, rows, loss_of, **{**fit, "lr": 10 * fit["lr"], "weight_decay": 0.0})
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _on_rows(torch: Any, fn: Any, feats: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """``fn(*features)`` on ``rows`` in chunks, without gradients, as one numpy array."""
    with torch.no_grad():
        return np.concatenate([fn(*[torch.from_numpy(np.ascontiguousarray(f[rows[i:i + 1024]])) for f in feats]).numpy()
                               for i in range(0, len(rows), 1024)])


def _halting_exits(trainable: list[Any]) -> list[int]:
    """The indices of the exits among ``trainable`` whose built-in head has ``score: halting``."""
    return [s.index for s in trainable if ((s.exit.head_spec or {}).get("options") or {}).get("score") == "halting"]


def _check_halting_run(bundle: Bundle, trainable: list[Any]) -> None:
    """The exits with ``score: halting`` must be one run of q_exit exits (the gate's survival product runs over
    consecutive Q-exits only), all of them trained here: their lambdas share one halting distribution."""
    idx = _halting_exits(trainable)
    if not idx:
        return
    for s in bundle.manifest.segments[idx[0]:idx[-1] + 1]:
        if s.index not in idx:
            raise BundleError(f"{bundle.path}: exit {s.index} lies between exits with score: halting ({idx}) and "
                              f"has no halting head; PALBERT's lambdas are trained over one run of exits: give it "
                              f"a built-in head with options {{score: halting}} and a q_exit gate, or move it")


def _fit_halting(torch: Any, heads: list[tuple[Any, list[np.ndarray]]], losses: np.ndarray, rows: np.ndarray,
                 eval_rows: np.ndarray, *, beta: float, hazard: float,
                 **fit: Any) -> tuple[float | None, float | None]:
    """Train the lambda (score) layers of ``heads`` (module, features), in exit order, jointly with PALBERT's
    objective (:func:`eecompile.halting.palbert_loss`) for per-sample exit losses ``losses`` [N, E + 1] (the final
    exit last); the exit heads stay frozen. Starts every lambda at the prior's ``hazard`` (where the KL is 0).
    Returns the objective on ``eval_rows`` (the held-out rows) and that of the prior's constant lambdas; both None
    when ``eval_rows`` is empty."""
    nn = torch.nn
    modules = [m for m, _ in heads]
    counts = [len(f) for _, f in heads]
    base: Any = nn.Module

    class Lambdas(base):
        """Every halting exit's lambda [B, E] from the features of each, concatenated in exit order."""

        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(modules)

        def forward(self, *xs: Any) -> Any:
            out, i = [], 0
            for m, c in zip(self.heads, counts, strict=True):
                out.append(m.score(*xs[i:i + c]).reshape(-1))
                i += c
            return torch.stack(out, 1)

    whole = Lambdas()
    feats = [f for _, fs in heads for f in fs]
    prior = torch.from_numpy(geometric_prior(hazard, len(heads)).astype(np.float32))
    t_losses = torch.from_numpy(losses.astype(np.float32))
    params = [p for m in modules for p in _start_constant(torch, m, hazard)]
    _fit_score_layers(torch, whole, params, feats, rows, lambda lam, ti: palbert_loss(torch, lam, t_losses[ti], prior,
                                                                                     beta), **fit)
    if not len(eval_rows):
        return None, None
    lams = torch.from_numpy(_on_rows(torch, whole, feats, eval_rows))
    with torch.no_grad():
        held = palbert_loss(torch, lams, t_losses[eval_rows], prior, beta)
        const = palbert_loss(torch, torch.full_like(lams, hazard), t_losses[eval_rows], prior, beta)
    return float(held), float(const)


def _predict(torch: Any, module: Any, feats: list[np.ndarray], n: int, forward: Any = None) -> np.ndarray:
    """The head's outputs for all N rows (logits, or a regression head's values)."""
    forward = forward or (lambda mod, xs: mod(*xs))
    out = []
    with torch.no_grad():
        for start in range(0, n, 1024):
            xs = [torch.from_numpy(np.ascontiguousarray(f[start:start + 1024])) for f in feats]
            out.append(forward(module, xs).numpy())
    return np.concatenate(out)
