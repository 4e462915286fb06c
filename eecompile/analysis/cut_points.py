"""``eecompile analyze``: the tensors a graph can be cut at, what each cut carries, the FLOPs before it.

A tensor T is a cut point when:
1. it is produced by a node of the main graph (never inside an If/Loop body) and is not recomputable
   (a tensor computed from the inputs alone is no place for an exit: no features yet);
2. it has a batch axis (an exit must produce one row per sample);
3. everything carried across the cut can be compacted: each carried tensor has a batch axis, or has none
   and a value that does not depend on the batch (see probe.py for the tensors that fail this).

Suggestions: among the cut points with the smallest carried set, the last tensor at each FLOPs position
(a Conv output and the Relu after it sit at the same position; cutting at the Conv would stop ORT fusing
Conv+Relu), spread over the FLOPs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from eecompile.analysis.partition import carried_across
from eecompile.analysis.prepared import PreparedModel

log = logging.getLogger(__name__)


@dataclass
class CutPoint:
    """A tensor of the main graph an exit could be put at.

    ``shape`` is the probed shape (``"batch"`` on the batch axis in dynamic mode, symbolic axes by name),
    ``dtype`` a numpy dtype name, ``carried`` the tensors a cut here hands to the next segment,
    ``inputs_after`` the model inputs read after it, ``flops_before`` the FLOPs per sample of everything
    before it (a multiply-add counts 2) and ``fraction`` that as a share of the whole model. ``problem`` says
    why it cannot be an exit (None: it can)."""

    tensor: str
    shape: list[int | str]
    dtype: str
    batch_axis: int | None
    carried: list[str]
    inputs_after: list[str]
    flops_before: int
    fraction: float
    order: int  # topological position of the producer
    problem: str | None = None  # why it cannot be an exit (None: it can)
    feeds_elementwise: bool = False  # read after the cut by an Add/Sum/Mul (a residual join)
    forks: bool = False  # read by two or more nodes after the cut (a block boundary with a residual branch)
    carried_bytes: int = 0  # bytes per sample handed to the next segment (what compaction gathers)
    exit_flops: int = 0  # a light exit here (pool + one linear layer to the final output's width) per sample

    def cost(self, total_flops: int) -> dict[str, Any]:
        """What an exit here costs: its light head's FLOPs as a share of the model's, the bytes per sample the
        cut carries, and whether a residual join reads the tensor after the cut (ONNX Runtime's per-segment
        optimisation and TensorRT lose the fused join there; the default ORT CPU engines keep it)."""
        return {"exit_flops_fraction": round(self.exit_flops / total_flops, 6) if total_flops else 0.0,
                "carried_bytes_per_sample": self.carried_bytes, "residual_join": self.feeds_elementwise}

    def to_json(self, total_flops: int = 0) -> dict[str, Any]:
        """The entry of ``eecompile analyze --json``'s ``cut_points`` list."""
        return {"tensor": self.tensor, "shape": self.shape, "flops_before": self.flops_before,
                "fraction": round(self.fraction, 6), "carried": self.carried, "inputs_after": self.inputs_after,
                "batch_axis": self.batch_axis, "valid": self.problem is None, "problem": self.problem,
                "cost": self.cost(total_flops)}


@dataclass
class AnalysisReport:
    """What ``eecompile analyze`` reports: the model's inputs and outputs (name, dtype, shape), its FLOPs per
    sample, its batch mode, every cut point and the suggested ones (tensor names, in graph order)."""

    model: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    total_flops: int
    batch_mode: str
    batch_note: str
    cut_points: list[CutPoint] = field(default_factory=list)
    suggested: list[str] = field(default_factory=list)

    @property
    def valid(self) -> list[CutPoint]:
        """The cut points an exit can be put at."""
        return [c for c in self.cut_points if c.problem is None]

    def to_json(self) -> dict[str, Any]:
        """The document ``eecompile analyze --json`` prints (valid cut points only)."""
        return {"model": self.model, "inputs": self.inputs, "outputs": self.outputs,
                "total_flops": self.total_flops, "batch_mode": self.batch_mode,
                "cut_points": [c.to_json(self.total_flops) for c in self.valid], "suggested": self.suggested}

    def print(self, show_all: bool = False) -> None:
        """Print the suggested cut points (every valid one with ``show_all``) as a table."""
        from rich.table import Table
        from rich.text import Text

        from eecompile.console import report_console

        console = report_console()
        console.print(Text.assemble((self.model, "bold"), f": {self.total_flops / 1e6:,.1f} MFLOPs per sample; "
                                                          f"{self.batch_note}"))
        rows = self.valid if show_all else [c for c in self.valid if c.tensor in self.suggested]
        title = "all cut points" if show_all else "suggested cut points (--all lists every one)"
        table = Table(title=title)
        for col in ("tensor", "shape", "FLOPs before", "fraction", "carried", "exit cost"):
            table.add_column(col, overflow="fold")
        for c in rows:
            carried = ", ".join(c.carried) + (f" (+ inputs {', '.join(c.inputs_after)})" if c.inputs_after else "")
            cost = c.cost(self.total_flops)
            what = (f"{cost['exit_flops_fraction']:.2%} FLOPs, {c.carried_bytes / 1e3:,.0f} kB carried"
                    + (", residual join" if c.feeds_elementwise else ""))
            table.add_row(c.tensor, str(c.shape), f"{c.flops_before / 1e6:,.2f}M", f"{c.fraction:.1%}", carried,
                          what)
        console.print(table)
        bad = [c for c in self.cut_points if c.problem is not None]
        if bad and show_all:
            console.print(f"{len(bad)} tensors cannot be cut at (e.g. '{bad[0].tensor}': {bad[0].problem})")


def find_cut_points(pm: PreparedModel) -> list[CutPoint]:
    """Every output of a main-graph node that is not recomputable, not a model output, was probed and has
    something after it that reads from before it, in topological order; each with the ``problem`` (cases 1-3
    of the module docstring) that keeps it from being an exit, or None. Raises nothing: problems are data."""
    idx, probe = pm.index, pm.probe
    all_nodes = (1 << len(idx.nodes)) - 1
    out: list[CutPoint] = []
    b0 = probe.batches[0]
    final = next((probe.facts.get(v.name or "") for v in idx.graph_outputs), None)
    width = int(final.shapes[b0][-1]) if final is not None and final.shapes.get(b0) else 1
    for i, node in enumerate(idx.nodes):
        if idx.recomputable[i]:
            continue
        for v in node.outputs:
            facts = probe.facts.get(v.name or "")
            if facts is None or v in idx.graph_outputs:
                continue
            before = idx.anc[i]
            carried, inputs_after = carried_across(idx, before, all_nodes & ~before)
            if not carried:
                continue  # nothing after the cut reads anything from before it (a dead end)
            problem = cut_problem(pm, v, carried)
            shape: list[int | str] = list(facts.shapes[probe.batches[0]])
            for axis, sym in facts.symbolic.items():
                shape[axis] = sym
            if facts.batch_axis is not None and pm.batch_mode == "dynamic":
                shape[facts.batch_axis] = "batch"
            frac = pm.cum_flops[i] / pm.total_flops if pm.total_flops else 0.0
            users = idx.consumers.get(v, set())
            joins = any(idx.nodes[j].op_type in _JOINS for j in users)
            out.append(CutPoint(facts.name, shape, facts.dtype, facts.batch_axis, [c.name or "" for c in carried],
                                [x.name or "" for x in inputs_after], pm.cum_flops[i], frac, i, problem, joins,
                                forks=len(users) >= 2, carried_bytes=_carried_bytes(probe, carried, b0),
                                exit_flops=_exit_flops(facts, b0, width)))
    return out


def _per_sample(shape: tuple[int, ...], batch_axis: int | None, batch: int) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n // batch if batch_axis is not None and batch else n


def _carried_bytes(probe: Any, carried: list[ir.Value], batch: int) -> int:
    import numpy as np

    total = 0
    for c in carried:
        f = probe.facts.get(c.name or "")
        if f is not None and f.shapes.get(batch) is not None:
            total += _per_sample(f.shapes[batch], f.batch_axis, batch) * np.dtype(f.dtype).itemsize
    return total


def _exit_flops(facts: Any, batch: int, width: int) -> int:
    """FLOPs per sample of a light exit at this tensor: pooling reads every element once, then one linear layer
    from its channels (axis 1 of a feature map, the last axis otherwise) to ``width`` outputs (2 per MAC)."""
    shape = facts.shapes.get(batch)
    if not shape:
        return 0
    channels = int(shape[1]) if len(shape) == 4 else int(shape[-1])
    return _per_sample(shape, facts.batch_axis, batch) + 2 * channels * width


def cut_problem(pm: PreparedModel, v: ir.Value, carried: list[ir.Value]) -> str | None:
    """Why ``v`` cannot be an exit when the cut carries ``carried`` (cases 2 and 3), or None."""
    facts = pm.probe.facts.get(v.name or "")
    if facts is None:
        return "ONNX Runtime could not expose it"
    if facts.problem:
        return facts.problem
    if pm.batch_mode == "dynamic" and facts.batch_axis is None:
        return "it has no batch axis (an exit must give one row per sample)"
    if pm.batch_mode == "dynamic":
        for c in carried:
            cf = pm.probe.facts.get(c.name or "")
            if cf is None:
                return f"carried tensor '{c.name}' could not be probed"
            if cf.problem:
                return f"it would carry '{c.name}', and {cf.problem}"
    return None


_JOINS = frozenset({"Add", "Sum", "Mul", "Sub"})
# Feature maps ([B, C, H, W]): a cut tensor that also feeds a residual join arrives in plain layout after the
# cut, so ORT CPU can no longer fuse that Add+Relu into its blocked Conv, and the loss cascades through the
# segment (measured on ResNet-50: chain/unsplit 1.111x with cuts inside stages, 1.050x at stage boundaries).
# Such cuts count as this much further from the FLOPs target when suggesting.
_JOIN_PENALTY = 0.08
# Token tensors ([B, T, D]): a layer output forks into the next layer and its residual branch; a head there
# sees the full residual stream (not an attention-internal tensor at the same FLOPs position).
_FORK_BONUS = 0.03


def _suggest_distance(c: CutPoint, target: float, total: int = 0) -> float:
    # An exit whose head costs x of the model's FLOPs counts x further from the target: cheaper cuts win ties.
    d = abs(c.fraction - target) + (c.exit_flops / total if total else 0.0)
    if len(c.shape) == 4 and c.feeds_elementwise:
        d += _JOIN_PENALTY
    if len(c.shape) == 3 and c.forks:
        d -= _FORK_BONUS
    return d


def suggest(cuts: list[CutPoint], total: int, n: int = 4) -> list[str]:
    """Up to ``n`` cut points with the smallest carried set, spread over the FLOPs, preferring tensors that
    are not read by a residual join after the cut."""
    valid = [c for c in cuts if c.problem is None and 0.02 < c.fraction < 0.98]
    if not valid:
        return []
    # The last tensor at each FLOPs position (keeps Conv+Relu fusible).
    # Among those, the one carrying least.
    by_pos: dict[int, CutPoint] = {}
    for c in valid:
        cur = by_pos.get(c.flops_before)
        if cur is None or (len(c.carried), -c.order) < (len(cur.carried), -cur.order):
            by_pos[c.flops_before] = c
    pool = list(by_pos.values())
    least = min(len(c.carried) for c in pool)
    clean = [c for c in pool if len(c.carried) <= least] or pool
    picked: list[CutPoint] = []
    for k in range(1, n + 1):
        target = k / (n + 1)
        best = min(clean, key=lambda c: (_suggest_distance(c, target, total), len(c.carried)))
        if best not in picked:
            picked.append(best)
    picked.sort(key=lambda c: c.order)
    return [c.tensor for c in picked]


def _io(values: list[ir.Value], pm: PreparedModel) -> list[dict[str, Any]]:
    res = []
    for v in values:
        shape = [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None
        res.append({"name": v.name, "dtype": str(v.dtype.numpy()) if v.dtype else None, "shape": shape})
    return res


def report_cut_points(pm: PreparedModel) -> AnalysisReport:
    """The cut points of a prepared model, with up to four suggestions (what ``eecompile analyze`` prints)."""
    cuts = find_cut_points(pm)
    report = AnalysisReport(str(pm.path), _io(pm.index.graph_inputs, pm), _io(pm.index.graph_outputs, pm),
                            pm.total_flops, pm.batch_mode, pm.batch_note, cuts)
    report.suggested = suggest(cuts, pm.total_flops)
    return report
