"""``eecompile auto``: choose where the exits go, train their heads and thresholds, write the bundle.

1. **Candidates**: ``analyze``'s suggested cuts (:func:`eecompile.analysis.cut_points.suggest`, ``candidates`` of
   them spread over the FLOPs), each with a light trained head (``head: {kind: linear}`` by default).
2. **Heads, all at once**: one bundle holding every candidate exit; :func:`eecompile.train.train_heads` collects
   the frozen features of all of them in one pass over the training data and trains every head.
3. **Costs**: on the calibration data, the chain with every exit recorded (:func:`collect_exit_table`) and the
   measured time to leave at each candidate exit (:func:`measure_latency`, through the runtime). Each head is
   also timed alone, so the cost of a subset of exits is the candidates' cost minus the heads it leaves out.
4. **Subsets**: every subset of up to ``max_exits`` candidates gets thresholds for the budget
   (:func:`search_thresholds` on its rows of the table) and a predicted speedup; the ``verify_top`` best are
   compiled for real (trained heads reused, ONNX Runtime CPU engines built), calibrated with
   :func:`calibrate_bundle`, and the one with the highest measured speedup within the budget is the bundle.
5. **Report** (``auto-report.json`` in the bundle): candidates, the ranking, the verified configurations and,
   when a hand-placed spec is given (``compare``), the same pipeline on it, side by side.

torch is needed for the head training (the ``train`` extra).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.errors import CalibrationError, SpecError

log = logging.getLogger(__name__)

REPORT_FILE = "auto-report.json"


@dataclass
class Configuration:
    """A set of exits and what it gives on the calibration data."""

    exits: list[str]  # cut tensors, in graph order
    predicted_speedup: float  # from the candidates' measured costs (before it was compiled)
    predicted_drop: float
    measured_speedup: float | None = None  # calibrate on the compiled bundle (its own measured latencies)
    measured_drop: float | None = None
    thresholds: list[float] | None = None
    exit_shares: list[float] | None = None


@dataclass
class AutoReport:
    bundle: str
    max_drop: float
    candidates: list[dict[str, Any]]  # tensor, FLOPs fraction, head agreement with the final exit (held out)
    ranking: list[Configuration]  # every subset tried, best predicted first
    verified: list[Configuration]  # compiled and calibrated
    chosen: Configuration
    hand_placed: Configuration | None = None  # the same pipeline on a spec placed by hand
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranking"] = d["ranking"][:20]
        return d

    def print(self) -> None:
        from rich.table import Table

        from eecompile.console import report_console

        c = report_console()
        t = Table(title=f"candidate exits ({len(self.candidates)})")
        for col in ("tensor", "FLOPs before", "head agreement with final (held out)"):
            t.add_column(col)
        for cand in self.candidates:
            agree = cand.get("agreement")
            t.add_row(cand["tensor"], f"{cand['fraction']:.1%}", "-" if agree is None else f"{agree:.3f}")
        c.print(t)
        t = Table(title=f"configurations compiled and calibrated (max drop {self.max_drop})")
        for col in ("exits", "predicted speedup", "measured speedup", "drop", "exit shares"):
            t.add_column(col)
        rows = [("", cfg) for cfg in self.verified]
        if self.hand_placed is not None:
            rows.append(("hand-placed: ", self.hand_placed))
        for tag, cfg in rows:
            mark = " (chosen)" if cfg is self.chosen or (tag == "" and cfg.exits == self.chosen.exits) else ""
            t.add_row(tag + ", ".join(cfg.exits) + mark,
                      "-" if tag else f"{cfg.predicted_speedup:.2f}x",
                      "-" if cfg.measured_speedup is None else f"{cfg.measured_speedup:.2f}x",
                      "-" if cfg.measured_drop is None else f"{cfg.measured_drop:+.4f}",
                      ", ".join(f"{s:.0%}" for s in cfg.exit_shares or []))
        c.print(t)
        for n in self.notes:
            c.print(n)


def _time_head(head: Path, shape: list[int], batch: int, repeats: int) -> float:
    """Median seconds of one head on random features (ONNX Runtime CPU, the runtime's thread settings)."""
    import onnxruntime as ort

    from eecompile.calibrate import session_options
    from eecompile.calibrate.latency import time_interleaved

    sess = ort.InferenceSession(str(head), session_options(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([batch, *shape[1:]]).astype(np.float32)
    return time_interleaved([lambda: sess.run(None, {inp.name: x})], rounds=repeats, budget_s=1.0)[0]


def _subset_costs(cum: np.ndarray, heads: np.ndarray, subset: tuple[int, ...]) -> np.ndarray:
    """Cumulative cost of leaving at each exit of ``subset`` (candidate indices) and at the final exit, when the
    other candidates' heads are not there: the candidates' measured cumulative costs minus the heads left out."""
    e = len(heads)
    dropped = np.array([j not in subset for j in range(e)])
    saved = np.concatenate([[0.0], np.cumsum(heads * dropped)])  # saved[k]: heads left out before exit k
    idx = [*subset, e]
    return np.asarray([cum[k] - saved[k] for k in idx], np.float64)


def _spec_doc(model: Path, exits: list[dict[str, Any]], final: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": str(model.absolute()), "exits": exits}
    if final:
        doc["final"] = {"output": final}
    return doc


def _write_spec(path: Path, doc: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _calibrated(bundle: Path, calib: Path, max_drop: float, batch: int, repeats: int,
                reference: Path | None, quiet: bool) -> tuple[float, float, list[float], list[float]]:
    from eecompile.calibrate import calibrate_bundle

    rep = calibrate_bundle(bundle, calib, max_drop=max_drop, batch_size=batch, repeats=repeats,
                           reference_model=reference, quiet=quiet)
    thr = [float(e["threshold"]) for e in rep.exits if e["threshold"] is not None]
    return float(rep.expected_speedup), float(rep.drop), thr, [float(e["share"]) for e in rep.exits]


def auto_bundle(model: str | Path, train: str | Path, calib: str | Path, output: str | Path, *, max_drop: float,
                candidates: int = 6, max_exits: int = 3, head: str = "linear", epochs: int = 30,
                final: str | None = None, dims: dict[str, int] | None = None, batch_size: int = 1,
                repeats: int = 100, verify_top: int = 3, compare: str | Path | None = None, force: bool = False,
                quiet: bool = False) -> AutoReport:
    """Place exits on ``model`` for an accuracy budget and write the bundle to ``output`` (see the module docstring).

    ``train``/``calib``: .npz files with the model inputs (and ``labels``); ``max_drop``: accuracy drop allowed
    (fraction, in (0, 1)); ``candidates``: cut points considered; ``max_exits``: most early exits kept;
    ``verify_top``: configurations compiled and calibrated for real; ``compare``: a spec with exits placed by hand,
    run through the same training and calibration for the report. Raises SpecError (nothing to cut, bad
    arguments), CalibrationError, and what compile, train-heads and calibrate raise."""
    from eecompile.analysis.cut_points import suggest
    from eecompile.bundle import Bundle, staged_bundle, write_manifest
    from eecompile.calibrate import (
        collect_exit_table,
        evaluate,
        load_data,
        measure_latency,
        search_thresholds,
    )
    from eecompile.calibrate.collect import ExitTable
    from eecompile.compiler import analyze_model, compile_model
    from eecompile.spec import HEAD_KINDS
    from eecompile.train import train_heads

    model, output = Path(model), Path(output)
    if head not in HEAD_KINDS:
        raise SpecError(f"auto: head kind '{head}' is unknown; use one of {', '.join(HEAD_KINDS)}")
    if candidates < 1 or max_exits < 1 or verify_top < 1:
        raise SpecError(f"auto: candidates ({candidates}), max exits ({max_exits}) and the configurations to verify "
                        f"({verify_top}) must be at least 1")
    if not 0.0 < max_drop < 1.0:
        raise CalibrationError(f"auto: --max-drop must be in (0, 1), got {max_drop}")
    if output.exists() and not force:
        from eecompile.errors import BundleError

        raise BundleError(f"{output}: already exists; pass --force to replace it")
    analysis = analyze_model(model, dims)
    cuts = suggest(analysis.cut_points, analysis.total_flops, n=candidates)
    if not cuts:
        raise SpecError(f"{model}: analyze finds no tensor to place an exit at (no valid cut point between 2% and "
                        f"98% of the FLOPs)")
    fraction = {c.tensor: c.fraction for c in analysis.cut_points}
    notes: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="eecompile-auto-"))
    try:
        # 1-2. every candidate in one bundle; its heads trained in one pass over the frozen features
        gate = {"kind": "max_prob", "threshold": 1.0}
        doc = _spec_doc(model, [{"at": c, "head": {"kind": head}, "gate": gate} for c in cuts], final)
        cand_path = work / "candidates.eebundle"
        compile_model(_write_spec(work / "candidates.yaml", doc), cand_path, dims=dims)
        trained = train_heads(cand_path, train, epochs=epochs, quiet=quiet)
        agreement = {h.index: h.agree_after for h in trained.heads}
        cand = Bundle.load(cand_path)
        m = cand.manifest
        e = m.n_early_exits
        cand_rows = [{"tensor": c, "fraction": fraction.get(c, 0.0), "agreement": agreement.get(k)}
                     for k, c in enumerate(cuts)]

        # 3. what each candidate gives and costs, measured
        inputs, labels = load_data(calib, m)
        table = collect_exit_table(cand, inputs, labels, quiet=True)
        cum_s, full_s = measure_latency(cand, inputs, batch_size=batch_size, repeats=repeats, reference_model=model)
        cum = np.asarray(cum_s, np.float64)
        heads = np.zeros(e)
        for k, seg in enumerate(m.segments[:-1]):
            shape = next((t.shape for t in seg.outputs if t.name == seg.exit.at[0]), None)
            head_file = cand_path / "heads" / f"exit{k}.onnx"
            if shape is not None and head_file.is_file() and all(isinstance(d, int) for d in shape[1:]):
                heads[k] = _time_head(head_file, [int(d) if isinstance(d, int) else 1 for d in shape], batch_size,
                                      repeats)
        baseline = float(full_s) if full_s is not None else float(cum[-1] - heads.sum())
        if full_s is None:
            notes.append("unsplit model not timed: speedups are against the chain without heads")

        # 4. every subset, ranked by its predicted cost; the best few compiled and calibrated
        ranking: list[tuple[float, Configuration, tuple[int, ...]]] = []
        for r in range(1, min(max_exits, e) + 1):
            for subset in itertools.combinations(range(e), r):
                costs = _subset_costs(cum, heads, subset)
                sub = ExitTable(table.scores[list(subset)], table.correct[[*subset, e]],
                                [table.fires_above[j] for j in subset], table.has_labels)
                thr = search_thresholds(sub, costs, max_drop)
                ev = evaluate(sub, thr, costs)
                cfg = Configuration([cuts[j] for j in subset], baseline / ev.expected_cost, float(ev.drop))
                ranking.append((ev.expected_cost, cfg, subset))
        ranking.sort(key=lambda t: (t[0], len(t[2])))
        verified: list[Configuration] = []
        built: dict[int, Path] = {}
        for i, (_, cfg, subset) in enumerate(ranking[:verify_top]):
            exits = [{"at": cuts[j], "head": str(cand_path / "heads" / f"exit{j}.onnx"), "gate": gate}
                     for j in subset]
            path = work / f"config{i}.eebundle"
            compile_model(_write_spec(work / f"config{i}.yaml", _spec_doc(model, exits, final)), path, dims=dims,
                          engines=True)
            cfg.measured_speedup, cfg.measured_drop, cfg.thresholds, cfg.exit_shares = _calibrated(
                path, Path(calib), max_drop, batch_size, repeats, model, quiet)
            verified.append(cfg)
            built[id(cfg)] = path
        within = [c for c in verified if c.measured_drop is not None and c.measured_drop <= max_drop + 1e-12]
        if not within:
            notes.append("no verified configuration met the budget on the calibration data; the best one is kept")
        chosen = max(within or verified, key=lambda c: c.measured_speedup or 0.0)

        hand: Configuration | None = None
        if compare is not None:
            hand = _hand_placed(Path(compare), work, train, Path(calib), max_drop, epochs, batch_size, repeats,
                                model, dims, quiet)

        report = AutoReport(str(output), max_drop, cand_rows, [c for _, c, _ in ranking], verified, chosen, hand,
                            notes)
        src = Bundle.load(built[id(chosen)])
        with staged_bundle(output, copy_from=src.path) as tmp:
            (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
            src.manifest.notes.append(f"exits placed by `eecompile auto` ({len(cuts)} candidates, "
                                      f"{len(ranking)} configurations; see {REPORT_FILE})")
            write_manifest(tmp, src.manifest)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _hand_placed(spec: Path, work: Path, train: str | Path, calib: Path, max_drop: float, epochs: int,
                 batch_size: int, repeats: int, model: Path, dims: dict[str, int] | None,
                 quiet: bool) -> Configuration:
    """A spec's own exits through the same steps: compile (engines built), train its trainable heads, calibrate."""
    from eecompile.compiler import compile_model
    from eecompile.spec import load_spec
    from eecompile.train import train_heads

    s = load_spec(spec)
    path = work / "hand.eebundle"
    bundle = compile_model(spec, path, dims=dims, engines=True)
    if any(seg.exit.head_spec and seg.exit.head_spec.get("kind") for seg in bundle.manifest.segments[:-1]):
        train_heads(path, train, epochs=epochs, quiet=quiet)
    cfg = Configuration([e.tensor for e in s.exits], float("nan"), float("nan"))
    cfg.measured_speedup, cfg.measured_drop, cfg.thresholds, cfg.exit_shares = _calibrated(
        path, calib, max_drop, batch_size, repeats, model, quiet)
    return cfg
