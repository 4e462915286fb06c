"""Thresholds for an accuracy budget, from latencies measured on the backend.

Two layers:

* **Core** (numpy only, testable on synthetic arrays): an :class:`ExitTable` holds every early exit's gate
  score and whether every exit's prediction matches the reference (the labels, or the final exit's answer
  when there are none). :func:`assign_exits`, :func:`evaluate`, :func:`search_thresholds` (cheapest
  expected cost with the drop within budget on the calibration data) and :func:`ltt_thresholds`
  (Learn-then-Test, as in CALM: thresholds whose risk on new data is within budget with probability
  >= 1 - delta).
* **Bundle** (:func:`calibrate_bundle`): runs the chain with every exit recorded, measures each segment's
  latency on the backend, picks thresholds, writes them and the report into the manifest atomically.

Conventions: a gate fires when ``score >= t`` (``score <= t`` for ``entropy``; see ``GateKind.fires_above``);
a NaN score never fires; a threshold of +inf (-inf for entropy) means "never exit here".
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eecompile.bundle import Bundle, Manifest, sha256_file, update_bundle
from eecompile.errors import BackendError, BundleError, CalibrationError, DataError
from eecompile.spec import GateKind

if TYPE_CHECKING:
    import onnx
    import onnxruntime

log = logging.getLogger(__name__)

METHODS = ("search", "ltt")
Costs = Sequence[float] | np.ndarray  # cost of leaving at exit k (cumulative), one per exit
PVALUES = ("binomial", "hoeffding_bentkus")


# ============================================================================================ core


@dataclass
class ExitTable:
    """What the chain with policy ``never`` says about each calibration sample.

    ``scores[e, n]``: gate value of early exit ``e`` (E early exits); ``correct[k, n]``: exit ``k``'s answer
    matches the reference (K = E + 1 exits, the final exit last); ``fires_above[e]``: the gate fires on
    large values; ``has_labels``: the reference is the labels (else the final exit's answer).
    """

    scores: np.ndarray
    correct: np.ndarray
    fires_above: list[bool]
    has_labels: bool = False

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.correct = np.asarray(self.correct, dtype=bool)
        if self.scores.ndim != 2 or self.correct.ndim != 2:
            raise CalibrationError("scores must be [early exits, samples] and correct [exits, samples]")
        e, n = self.scores.shape
        if self.correct.shape != (e + 1, n):
            raise CalibrationError(
                f"correct has shape {list(self.correct.shape)}; with {e} early exits and {n} samples it must be "
                f"[{e + 1}, {n}] (one row per exit, the final exit last)"
            )
        if len(self.fires_above) != e:
            raise CalibrationError(f"fires_above has {len(self.fires_above)} entries for {e} early exits")

    @property
    def n_samples(self) -> int:
        return int(self.scores.shape[1])

    @property
    def n_early(self) -> int:
        return int(self.scores.shape[0])

    def subset(self, rows: np.ndarray) -> ExitTable:
        return ExitTable(self.scores[:, rows], self.correct[:, rows], list(self.fires_above), self.has_labels)


def correctness(preds: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """``correct[k, n]`` from predictions ``preds[k, n, ...]`` (argmax per exit, final exit last).

    The reference is the labels (``[n, ...]``) or, when None, the final exit's predictions. Samples with several
    predictions (tokens) count as correct only when all of them match.
    """
    preds = np.asarray(preds)
    ref = preds[-1] if reference is None else np.asarray(reference)
    if ref.shape != preds.shape[1:]:
        raise DataError(
            f"labels have shape {list(ref.shape)} but the model predicts {list(preds.shape[1:])} per batch; "
            f"give one label per sample (class indices)"
        )
    eq = preds == ref[None]
    return eq.reshape(eq.shape[0], eq.shape[1], -1).all(axis=2)


def never_threshold(fires_above: bool) -> float:
    return math.inf if fires_above else -math.inf


def _fires(scores: np.ndarray, threshold: float, above: bool) -> np.ndarray:
    # Comparisons with NaN are False, so a NaN score never fires.
    with np.errstate(invalid="ignore"):
        return scores >= threshold if above else scores <= threshold


def assign_exits(scores: np.ndarray, thresholds: Sequence[float], fires_above: Sequence[bool]) -> np.ndarray:
    """Exit taken by each sample: the first early exit whose gate fires, else the final exit (= E)."""
    scores = np.asarray(scores, dtype=np.float64)
    e, n = scores.shape
    fires = np.ones((e + 1, n), dtype=bool)
    for k in range(e):
        t = float(thresholds[k])
        fires[k] = False if math.isinf(t) and (t > 0) == bool(fires_above[k]) else _fires(scores[k], t, fires_above[k])
    return np.argmax(fires, axis=0)


@dataclass
class Evaluation:
    """Outcome of one threshold setting on an :class:`ExitTable`."""

    exit_index: np.ndarray  # [N]
    full_accuracy: float  # final exit vs reference (1.0 without labels)
    accuracy: float  # early-exit chain vs reference
    drop: float  # full_accuracy - accuracy
    loss: float  # share of samples the final exit gets right and the chain gets wrong (>= drop)
    expected_cost: float
    shares: list[float]  # per exit


def evaluate(table: ExitTable, thresholds: Sequence[float], costs: Costs) -> Evaluation:
    """Accuracy, drop and expected cost of ``thresholds``; ``costs[k]`` = cost of leaving at exit k."""
    idx = assign_exits(table.scores, thresholds, table.fires_above)
    n = table.n_samples
    cols = np.arange(n)
    ok = table.correct[idx, cols]
    full = table.correct[-1]
    c = np.asarray(costs, dtype=np.float64)
    return Evaluation(
        exit_index=idx,
        full_accuracy=float(full.mean()) if n else 1.0,
        accuracy=float(ok.mean()) if n else 1.0,
        drop=float(full.mean() - ok.mean()) if n else 0.0,
        loss=float((full & ~ok).mean()) if n else 0.0,
        expected_cost=float(c[idx].mean()) if n else float(c[-1]),
        shares=(np.bincount(idx, minlength=table.n_early + 1) / max(n, 1)).tolist(),
    )


def oracle_exits(table: ExitTable) -> np.ndarray:
    """Each sample's first exit that already matches the reference (the final exit when none does)."""
    return np.argmax(np.vstack([table.correct[:-1], np.ones((1, table.n_samples), bool)]), axis=0)


def candidate_thresholds(scores: np.ndarray, above: bool, n: int = 64) -> list[float]:
    """Candidate thresholds for one exit, strict to loose: 'never', then score quantiles."""
    finite = scores[np.isfinite(scores)]
    qs = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, n))) if finite.size else np.array([])
    qs = qs[::-1] if above else qs
    return [never_threshold(above), *[float(q) for q in qs]]


def _risk_fn(table: ExitTable, risk: str) -> Callable[[np.ndarray], float]:
    full = table.correct[-1]
    cols = np.arange(table.n_samples)
    n = max(table.n_samples, 1)
    if risk == "drop":
        full_ok = int(full.sum())
        return lambda idx: (full_ok - int(table.correct[idx, cols].sum())) / n
    if risk == "loss":
        return lambda idx: int((full & ~table.correct[idx, cols]).sum()) / n
    raise ValueError(risk)


def search_thresholds(table: ExitTable, costs: Costs, max_drop: float, *, n_candidates: int = 64,
                      risk: str = "drop", max_rounds: int = 20) -> list[float]:
    """Per-exit thresholds minimising expected cost with the risk <= ``max_drop`` on ``table``.

    ``risk``: ``drop`` (final accuracy minus chain accuracy) or ``loss`` (share the final exit gets right and
    the chain wrong; what Learn-then-Test certifies). Coordinate descent over score quantiles, started from
    "no exit fires" and from the best point of a shared-quantile path; the cheaper result wins.
    """
    e = table.n_early
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (e + 1,):
        raise CalibrationError(f"costs has {c.size} entries; it needs one per exit ({e + 1})")
    if e == 0 or table.n_samples == 0:
        return [never_threshold(a) for a in table.fires_above]
    risk_of = _risk_fn(table, risk)
    cands = [candidate_thresholds(table.scores[k], table.fires_above[k], n_candidates) for k in range(e)]
    # Every candidate's firing mask is computed once; an evaluation is then an argmax over E + 1 rows.
    masks = [[np.zeros(table.n_samples, bool) if math.isinf(t) else _fires(table.scores[k], t, table.fires_above[k])
              for t in cands[k]] for k in range(e)]
    last = np.ones(table.n_samples, bool)

    def score(choice: list[int]) -> tuple[float, float]:
        idx = np.argmax(np.vstack([*(masks[k][choice[k]] for k in range(e)), last]), axis=0)
        return risk_of(idx), float(c[idx].mean())

    def descend(choice: list[int]) -> tuple[list[int], float]:
        best_cost = score(choice)[1]
        for _ in range(max_rounds):
            changed = False
            for k in range(e):
                for j in range(len(cands[k])):
                    if j == choice[k]:
                        continue
                    trial = [*choice[:k], j, *choice[k + 1:]]
                    r, cost = score(trial)
                    if r <= max_drop + 1e-12 and cost < best_cost - 1e-12:
                        choice, best_cost, changed = trial, cost, True
            if not changed:
                break
        return choice, best_cost

    starts = [[0] * e]
    # Shared-quantile path: the same candidate position at every exit, strict to loose; keep the loosest
    # feasible point as a second start (coordinate descent alone can stall where exits must move together).
    path_best: list[int] | None = None
    for j in range(1, max(len(x) for x in cands)):
        trial = [min(j, len(cands[k]) - 1) for k in range(e)]
        r, _ = score(trial)
        if r <= max_drop + 1e-12:
            path_best = trial
    if path_best is not None:
        starts.append(path_best)
    results = [descend(s) for s in starts]
    choice, _ = min(results, key=lambda rc: rc[1])
    return [cands[k][choice[k]] for k in range(e)]


# ----------------------------------------------------------------------------------- Learn-then-Test


def binom_cdf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) <= k], exact (log-space sum, no scipy)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * math.fsum(math.exp(t - m) for t in terms))


def binomial_pvalue(errors: int, n: int, alpha: float) -> float:
    """p-value of H0: risk > alpha, from ``errors`` 0/1 losses in ``n`` samples (exact binomial tail)."""
    return binom_cdf(errors, n, alpha)


def hoeffding_bentkus_pvalue(errors: int, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of H0: risk > alpha (valid for any loss in [0, 1]; Bates et al. 2021)."""
    rhat = errors / n
    r = min(rhat, alpha)

    def h1(a: float, b: float) -> float:
        if a <= 0.0:
            return -math.log1p(-b)
        return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))

    hoeffding = math.exp(-n * h1(r, alpha))
    bentkus = math.e * binom_cdf(math.ceil(n * rhat), n, alpha)
    return min(1.0, hoeffding, bentkus)


def samples_needed(max_drop: float, delta: float) -> int:
    """Fewest test samples for which even zero errors certify ``risk <= max_drop`` at level ``delta``."""
    return math.ceil(math.log(delta) / math.log1p(-max_drop) - 1e-12)


@dataclass
class LTTResult:
    thresholds: list[float]
    certified: bool
    n_learn: int
    n_test: int
    n_candidates: int
    n_certified: int
    p_value: float | None  # of the chosen configuration
    test_loss: float | None


def ltt_thresholds(table: ExitTable, costs: Costs, max_drop: float, delta: float, *,
                   learn_fraction: float = 0.3, pvalue: str = "binomial", seed: int = 0,
                   n_paths: int = 24) -> LTTResult:
    """Learn-then-Test: thresholds with P(risk on new data <= max_drop) >= 1 - delta.

    The risk is the share of samples the final exit gets right and the chain gets wrong (an upper bound on
    the accuracy drop; without labels, disagreement with the final exit). *Learn*: on a random
    ``learn_fraction`` of the samples, search cheapest thresholds for a ladder of budgets, giving candidate
    configurations ordered strict to loose. *Test*: on the rest, a p-value per candidate, fixed-sequence
    testing from the strictest, stopping at the first that is not rejected at level ``delta``. Every rejected
    candidate is certified; the cheapest is returned. None certified: every gate is set to never fire.
    """
    _check_budget(max_drop, delta)
    if pvalue not in PVALUES:
        raise CalibrationError(f"p-value '{pvalue}' is unknown; use one of {', '.join(PVALUES)}")
    if not 0.0 < learn_fraction < 1.0:
        raise CalibrationError(f"learn_fraction must be in (0, 1), got {learn_fraction}")
    n = table.n_samples
    need = samples_needed(max_drop, delta)
    n_learn = int(round(learn_fraction * n))
    n_test = n - n_learn
    if n_test < need:
        total = math.ceil(need / (1.0 - learn_fraction))
        raise CalibrationError(
            f"ltt with max drop {max_drop} and delta {delta} needs at least {need} test samples (even with zero "
            f"errors fewer cannot certify the budget), i.e. at least {total} calibration samples with "
            f"{learn_fraction:.0%} kept for learning; got {n}. Give more calibration data, a larger --max-drop "
            f"or --delta, or use --method search"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    learn, test = table.subset(perm[:n_learn]), table.subset(perm[n_learn:])
    # Learn: the cheapest configuration for a ladder of budgets up to the target, each found on `learn` only,
    # so the hypotheses are fixed before `test` is looked at (what makes fixed-sequence testing valid).
    # "No exit fires" is left out: it is always safe and certifying it says nothing.
    never = [never_threshold(a) for a in table.fires_above]
    configs: list[list[float]] = []
    for b in np.linspace(0.0, max_drop, n_paths + 1)[1:]:
        cfg = search_thresholds(learn, costs, float(b), risk="loss")
        if cfg != never and cfg not in configs:
            configs.append(cfg)
    learn_risk = [evaluate(learn, cfg, costs).loss for cfg in configs]
    learn_cost = [evaluate(learn, cfg, costs).expected_cost for cfg in configs]
    order = sorted(range(len(configs)), key=lambda i: (learn_risk[i], -learn_cost[i]))
    pfun = binomial_pvalue if pvalue == "binomial" else hoeffding_bentkus_pvalue
    certified: list[tuple[float, int, float, float]] = []  # (test cost, config, p, loss)
    for i in order:
        ev = evaluate(test, configs[i], costs)
        errors = int(round(ev.loss * n_test))
        p = pfun(errors, n_test, max_drop)
        if p > delta:
            break
        certified.append((ev.expected_cost, i, p, ev.loss))
    if not certified:
        return LTTResult(never, False, n_learn, n_test, len(configs), 0,
                         None, None)
    _, best, p, loss = min(certified, key=lambda t: (t[0], t[1]))
    return LTTResult(configs[best], True, n_learn, n_test, len(configs), len(certified), p, loss)


def _check_budget(max_drop: float, delta: float | None = None) -> None:
    if not (isinstance(max_drop, (int, float)) and 0.0 < max_drop < 1.0):
        raise CalibrationError(f"--max-drop must be in (0, 1) (e.g. 0.01 for one point of accuracy), got {max_drop}")
    if delta is not None and not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise CalibrationError(f"--delta must be in (0, 1) (e.g. 0.05), got {delta}")


def pareto_curve(table: ExitTable, costs: Costs, baseline_cost: float,
                 budgets: Sequence[float] | None = None) -> list[dict[str, float]]:
    """Accuracy against speedup of the cheapest thresholds for a ladder of budgets (for the plot)."""
    budgets = list(budgets) if budgets is not None else [0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12,
                                                          0.2, 0.3, 0.5, 1.0]
    out = []
    for b in budgets:
        cfg = search_thresholds(table, costs, b) if b > 0 else [never_threshold(a) for a in table.fires_above]
        ev = evaluate(table, cfg, costs)
        out.append({"budget": float(b), "accuracy": ev.accuracy, "speedup": baseline_cost / ev.expected_cost})
    return out


# ====================================================================================== the report


@dataclass
class CalibrationReport:
    method: str
    max_drop: float
    delta: float | None
    reference: str  # "labels" or "final exit"
    n_samples: int
    backend: str
    batch_size: int
    exits: list[dict[str, Any]]  # per exit: index, name, gate, threshold, share, accuracy, cumulative_ms
    full_accuracy: float
    accuracy: float
    drop: float
    expected_ms: float
    baseline_ms: float
    baseline: str  # "unsplit model" or "whole chain"
    expected_speedup: float
    oracle_speedup: float
    certified: bool | None = None  # ltt only
    ltt: dict[str, Any] | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe types, for ``manifest.calibration``."""
        from dataclasses import asdict

        return _plain(asdict(self))

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        what = "accuracy" if self.reference == "labels" else "agreement w/ final"
        t = Table(title=f"calibration ({self.method}, max drop {self.max_drop:g}"
                        + (f", delta {self.delta:g}" if self.method == "ltt" else "") + f", {self.n_samples} samples)")
        for col in ("exit", "gate", "threshold", "share exiting", f"{what} of those exiting", "cumulative ms"):
            t.add_column(col, justify="right")
        for e in self.exits:
            acc = "-" if e["accuracy"] is None else f"{e['accuracy']:.4f}"
            thr = "never" if e["threshold"] is None or not math.isfinite(e["threshold"]) else f"{e['threshold']:.4g}"
            t.add_row(str(e["name"] or (e["index"] if e["gate"] else "final")), e["gate"] or "final",
                      thr if e["gate"] else "-", f"{e['share']:.3f}", acc, f"{e['cumulative_ms']:.4f}")
        c = Console()
        c.print(t)
        c.print(f"{what}: full model {self.full_accuracy:.4f}, early-exit chain {self.accuracy:.4f} "
                f"(drop {self.drop:+.4f}, budget {self.max_drop:g})")
        c.print(f"expected {self.expected_ms:.4f} ms vs {self.baseline} {self.baseline_ms:.4f} ms on "
                f"{self.backend} at batch {self.batch_size}: speedup {self.expected_speedup:.2f}x "
                f"(oracle {self.oracle_speedup:.2f}x)")
        if self.certified is False:
            c.print("[bold red]no threshold can be certified[/]: every gate is set to never fire")
        for note in self.notes:
            c.print(f"note: {note}")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ======================================================================= running the bundle's chain


def load_data(path: str | Path, manifest: Manifest) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The model inputs (by name) and the optional ``labels`` of an .npz (checked by :mod:`eecompile.runtimes.data`)."""
    from eecompile.runtimes.data import load_npz

    ds = load_npz(path, manifest.inputs)
    return ds.arrays, ds.labels


def session_options(threads: int | None = None) -> onnxruntime.SessionOptions:
    """ORT options for measuring: no spinning (sessions run one after another and would fight for cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def _add_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Expose internal tensors as graph outputs (a copy; types from shape inference where known)."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    todo = [n for n in names if n not in have]
    if not todo:
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        infos = {v.name: v for v in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - shape inference is a nicety here; ORT infers the type anyway
        infos = {}
    produced = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.initializer}
    for n in todo:
        if n not in produced:
            raise BundleError(f"tensor '{n}' is not computed in this segment; recompile the bundle")
        model.graph.output.append(infos[n] if n in infos else helper.make_empty_tensor_value_info(n))
    return model


class ChainProbe:
    """Runs a bundle's segments one after another in ONNX Runtime on every row (policy ``never``).

    ``extra[k]`` names internal tensors of segment k to return as well (the features heads train on).
    Each row's outputs come from every exit: nothing is dropped, so calibration and training see all exits.
    """

    def __init__(self, bundle: Bundle, extra: Mapping[int, Sequence[str]] | None = None,
                 threads: int | None = None) -> None:
        import onnx
        import onnxruntime as ort

        self.bundle = bundle
        self.manifest = bundle.manifest
        self.sessions: list[ort.InferenceSession] = []
        self.models: list[onnx.ModelProto] = []
        so = session_options(threads)
        for seg in self.manifest.segments:
            path = bundle.verify_file(seg.file)
            model = onnx.load(str(path))
            names = list((extra or {}).get(seg.index, []))
            if names:
                model = _add_outputs(model, names)
            self.models.append(model)
            try:
                self.sessions.append(ort.InferenceSession(model.SerializeToString(), so,
                                                          providers=["CPUExecutionProvider"]))
            except Exception as e:  # noqa: BLE001 - ORT raises its own types; name the file instead
                raise BundleError(f"{path}: ONNX Runtime cannot load this segment ({e}); recompile the bundle") from e

    def segment_feeds(self, k: int, env: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = self.manifest.segments[k]
        feeds: dict[str, np.ndarray] = {}
        gate = seg.exit.gate
        for i in self.sessions[k].get_inputs():
            if gate is not None and i.name == gate.threshold_input:
                feeds[i.name] = np.asarray(gate.threshold, np.float32)
            elif i.name in env:
                feeds[i.name] = env[i.name]
            else:
                raise BundleError(f"{seg.file}: input '{i.name}' is produced by no earlier segment; recompile the bundle")
        return feeds

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Every segment's outputs (by name) for one batch of model inputs."""
        env: dict[str, np.ndarray] = dict(inputs)
        outs: list[dict[str, np.ndarray]] = []
        for k, sess in enumerate(self.sessions):
            names = [o.name for o in sess.get_outputs()]
            values = sess.run(names, self.segment_feeds(k, env))
            out = dict(zip(names, values, strict=True))
            outs.append(out)
            env.update(out)
        return outs


def iter_batches(n: int, batch_size: int, label: str, quiet: bool = False) -> Any:
    """Row slices of ``batch_size`` with a progress bar on the terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    starts = range(0, n, batch_size)
    if quiet:
        yield from (slice(s, min(s + batch_size, n)) for s in starts)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=n)
        for s in starts:
            yield slice(s, min(s + batch_size, n))
            bar.advance(task, min(batch_size, n - s))


def final_output(manifest: Manifest) -> str:
    """The final output calibration and training compare against (the first of the model's outputs)."""
    return manifest.outputs[0].name


def predictions(logits: np.ndarray, class_axis: int) -> np.ndarray:
    return np.argmax(logits, axis=class_axis if class_axis >= 0 else logits.ndim + class_axis)


def collect_exit_table(bundle: Bundle, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None, *,
                       batch_size: int = 256, quiet: bool = False) -> ExitTable:
    """Gate scores and per-exit correctness for every sample (chain with policy ``never``)."""
    m = bundle.manifest
    for seg in m.segments[:-1]:
        g = seg.exit.gate
        if g is None or not g.score_output:
            raise BundleError(
                f"{bundle.path}: exit {seg.exit.index} has no gate score output (exit.gate.score_output); "
                f"recompile the bundle with this eecompile version"
            )
    if m.batch_mode == "per_sample":
        batch_size = 1
    probe = ChainProbe(bundle)
    out_name = final_output(m)
    n = next(iter(inputs.values())).shape[0]
    e = len(m.segments) - 1
    scores = np.empty((e, n), np.float64)
    preds: np.ndarray | None = None
    for rows in iter_batches(n, batch_size, "running every exit", quiet):
        outs = probe.run({k: v[rows] for k, v in inputs.items()})
        for k, seg in enumerate(m.segments):
            p = predictions(outs[k][seg.exit.outputs[out_name]], m.class_axis)
            if preds is None:
                preds = np.empty((e + 1, n, *p.shape[1:]), p.dtype)
            preds[k, rows] = p
            if seg.exit.gate is not None and seg.exit.gate.score_output:
                scores[k, rows] = np.asarray(outs[k][seg.exit.gate.score_output], np.float64).reshape(-1)
    assert preds is not None
    correct = correctness(preds, labels)
    fires = [GateKind(s.exit.gate.kind).fires_above for s in m.segments[:-1] if s.exit.gate is not None]
    return ExitTable(scores, correct, fires, has_labels=labels is not None)


# ------------------------------------------------------------------------------------------ latency


def _time_session(run: Callable[[], Any], repeats: int, warmup: int = 5, budget_s: float = 3.0) -> float:
    """Median seconds of ``run`` over a block of repeats after warm-up (stops early past ``budget_s``)."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and len(times) >= 5:
            break
    return statistics.median(times)


def find_source_model(bundle: Bundle) -> Path | None:
    """The unsplit model the bundle came from, when it is still where the manifest says (same sha256)."""
    src = bundle.manifest.source_model or {}
    name = src.get("file") or src.get("path")
    if not name:
        return None
    for p in (Path(name), bundle.path / name, bundle.path.parent / name):
        if p.is_file() and (not src.get("sha256") or sha256_file(p) == src["sha256"]):
            return p
    return None


def measure_latency(bundle: Bundle, inputs: Mapping[str, np.ndarray], *, backend: str = "onnxruntime",
                    batch_size: int = 1, repeats: int = 100, threads: int | None = None,
                    reference_model: str | Path | None = None) -> tuple[list[float], float | None]:
    """Median seconds to leave at each exit at ``batch_size`` on ``backend``, and of the unsplit model.

    Exit k is timed through the runtime itself (``EarlyExitRunner.run`` with exit k forced: earlier gates
    "never", gate k "always"), so the cost model includes what a real call pays: input checks, every
    segment up to k, gate read-back, scatter. The unsplit model (ONNX Runtime only) is timed in the same run
    with the same thread settings, so the ratio is fair. Returns cumulative seconds per exit.
    """
    import onnxruntime as ort

    from eecompile.runtimes.chain import EarlyExitRunner
    from eecompile.runtimes.onnxruntime import default_threads

    n = next(iter(inputs.values())).shape[0]
    b = min(batch_size, n)
    batch = {k: np.ascontiguousarray(v[:b]) for k, v in inputs.items()}
    options: dict[str, Any] = {"threads": threads} if threads and backend == "onnxruntime" else {}
    runner = EarlyExitRunner(bundle, backend=backend, **options)
    e = len(bundle.manifest.segments) - 1
    cum: list[float] = []
    try:
        for k in range(e + 1):
            forced: list[float | str] = ["never"] * e
            if k < e:
                forced[k] = "always"

            def call(f: list[float | str] = forced) -> Any:
                return runner.run(batch, thresholds=f)

            cum.append(_time_session(call, repeats))
    finally:
        runner.close()
    full: float | None = None
    src = Path(reference_model) if reference_model is not None else find_source_model(bundle)
    if src is not None and backend == "onnxruntime":
        try:
            sess = ort.InferenceSession(str(src), session_options(threads or default_threads()),
                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own types; name the file instead
            raise BackendError(f"{src}: ONNX Runtime cannot load the unsplit model ({e})") from e
        feeds = {i.name: batch[i.name] for i in sess.get_inputs()}
        full = _time_session(lambda: sess.run(None, feeds), repeats)
    # A later exit never costs less than an earlier one (timing noise can say otherwise at tiny sizes).
    return list(np.maximum.accumulate(np.asarray(cum))), full


# ------------------------------------------------------------------------------------------- entry


def calibrate_bundle(bundle: str | Path | Bundle, data: str | Path, *, max_drop: float, method: str = "search",
                     delta: float = 0.05, backend: str = "onnxruntime", batch_size: int = 1,
                     plot: str | Path | None = None, repeats: int = 100, threads: int | None = None,
                     reference_model: str | Path | None = None, seed: int = 0, quiet: bool = False,
                     costs: Sequence[float] | None = None) -> CalibrationReport:
    """Choose every early exit's threshold for an accuracy budget and write them into the bundle.

    ``costs`` (seconds per segment) skips the latency measurement (for tests and replayed measurements).
    """
    _check_budget(max_drop, delta if method == "ltt" else None)
    if method not in METHODS:
        raise CalibrationError(f"method '{method}' is unknown; use one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise CalibrationError(f"--batch must be >= 1, got {batch_size}")
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m = b.manifest
    if len(m.segments) < 2:
        raise CalibrationError(f"{b.path}: the bundle has no early exit; nothing to calibrate")
    inputs, labels = load_data(data, m)
    n = next(iter(inputs.values())).shape[0]
    if n == 0:
        raise DataError(f"{data}: no samples")
    if method == "ltt":
        need = samples_needed(max_drop, delta)
        total = math.ceil(need / 0.7)
        if n < total:  # fail before the slow part
            raise CalibrationError(
                f"{data}: ltt with max drop {max_drop} and delta {delta} needs at least {total} calibration "
                f"samples ({need} to test after 30% kept for learning); got {n}. Give more data, a larger "
                f"--max-drop or --delta, or use --method search"
            )
    table = collect_exit_table(b, inputs, labels, quiet=quiet)
    notes: list[str] = []
    if costs is None:
        cum_s, full_s = measure_latency(b, inputs, backend=backend, batch_size=batch_size, repeats=repeats,
                                        threads=threads, reference_model=reference_model)
    else:
        cum_s, full_s = list(np.cumsum(np.asarray(costs, np.float64))), None
    cum = np.asarray(cum_s, np.float64) * 1e3  # ms to leave at exit k
    if full_s is not None:
        baseline_ms, baseline = full_s * 1e3, "unsplit model"
    else:
        baseline_ms, baseline = float(cum[-1]), "whole chain"
        notes.append("unsplit model not timed (not found where the manifest says, or not an onnxruntime backend): "
                     "speedups are against running every segment")
    ltt: LTTResult | None = None
    if method == "search":
        thresholds = search_thresholds(table, cum, max_drop)
    else:
        ltt = ltt_thresholds(table, cum, max_drop, delta, seed=seed)
        thresholds = ltt.thresholds
        if not ltt.certified:
            notes.append(f"no threshold can be certified for drop <= {max_drop} with probability >= {1 - delta} "
                         f"on {ltt.n_test} test samples; every gate is set to never fire")
    ev = evaluate(table, thresholds, cum)
    oracle = oracle_exits(table)
    ref = "labels" if labels is not None else "final exit"
    exits = []
    for k, seg in enumerate(m.segments):
        here = ev.exit_index == k
        gate = seg.exit.gate
        exits.append({
            "index": k, "name": seg.exit.name, "gate": gate.kind if gate else None,
            "threshold": float(thresholds[k]) if gate else None, "share": float(here.mean()),
            "accuracy": float(table.correct[k, here].mean()) if here.any() else None,
            "cumulative_ms": float(cum[k]),
        })
    report = CalibrationReport(
        method=method, max_drop=max_drop, delta=delta if method == "ltt" else None, reference=ref, n_samples=n,
        backend=backend, batch_size=batch_size, exits=exits, full_accuracy=ev.full_accuracy, accuracy=ev.accuracy,
        drop=ev.drop, expected_ms=ev.expected_cost, baseline_ms=baseline_ms, baseline=baseline,
        expected_speedup=baseline_ms / ev.expected_cost, oracle_speedup=baseline_ms / float(cum[oracle].mean()),
        certified=ltt.certified if ltt else None,
        ltt=None if ltt is None else {"n_learn": ltt.n_learn, "n_test": ltt.n_test, "candidates": ltt.n_candidates,
                                      "certified_candidates": ltt.n_certified, "p_value": ltt.p_value,
                                      "test_loss": ltt.test_loss, "p_value_kind": "binomial"},
        curve=pareto_curve(table, cum, baseline_ms), notes=notes,
    )

    def change(_root: Path, manifest: Manifest) -> None:
        for k, seg in enumerate(manifest.segments):
            if seg.exit.gate is not None:
                seg.exit.gate.threshold = float(thresholds[k])
        manifest.calibration = report.to_dict()

    update_bundle(b.path, change)
    if plot is not None:
        plot_report(report, plot)
    return report


def plot_report(report: CalibrationReport, path: str | Path) -> Path:
    """Accuracy against speedup (cheapest thresholds per budget) and the exit histogram, in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CalibrationError("--plot needs matplotlib: pip install 'eecompile[plot]'") from e
    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [p["speedup"] for p in report.curve]
    ys = [p["accuracy"] for p in report.curve]
    ax1.plot(xs, ys, "o-", label="cheapest thresholds per budget")
    ax1.plot([report.expected_speedup], [report.accuracy], "r*", markersize=14, label="chosen")
    ax1.axhline(report.full_accuracy - report.max_drop, color="gray", ls="--", lw=1, label="budget")
    ax1.axvline(report.oracle_speedup, color="green", ls=":", lw=1, label="oracle speedup")
    what = "accuracy" if report.reference == "labels" else "agreement with final exit"
    ax1.set_xlabel(f"speedup vs {report.baseline} ({report.backend}, batch {report.batch_size})")
    ax1.set_ylabel(what)
    ax1.set_title("accuracy - speedup")
    ax1.legend(fontsize=8)
    names = [str(e["name"] or (e["index"] if e["gate"] else "final")) for e in report.exits]
    ax2.bar(names, [e["share"] for e in report.exits], color="tab:blue")
    ax2.set_xlabel("exit")
    ax2.set_ylabel("share of samples")
    ax2.set_title("where samples exit")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
