"""Results as JSON, a markdown table and PNG plots (matplotlib imported lazily; plots are skipped without it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _r(s: dict[str, Any] | None, unit: str = "x", digits: int = 3) -> str:
    """A ratio or time summary as 'median (min-max)'."""
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _ok(holds: bool | None) -> str:
    return "n/a" if holds is None else ("holds" if holds else "misses")


def markdown(results: dict[str, Any]) -> str:
    """The results table of benchmarks/README.md."""
    meta = results["meta"]
    f = results["figures"]
    target = f" (engines: {meta['ort_target']})" if meta.get("ort_target") else ""
    lines = [f"Run: {meta['mode']} mode, {meta['date']}, {meta['threads']} threads, onnxruntime {meta['onnxruntime']}, "
             f"{meta['cpu']}{target}. Ratios are medians of per-round paired ratios, (min-max) over rounds.", ""]
    if "overhead" in f:
        lines += ["### Overhead: chain with no gate firing / unsplit model (target <= 1.02)", "",
                  "| model | batch | exits | unsplit ms | chain ms | wall ratio | CPU-time ratio | target |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in f["overhead"]["rows"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['exits']} | {_r(r['unsplit_ms'], '', 2)} | "
                         f"{_r(r['chain_ms'], '', 2)} | {_r(r['ratio'])} | {_r(r['cpu_ratio'])} | {_ok(r['holds'])} |")
        lines.append("")
        eng_rows = [r for r in f["overhead"]["rows"] if r.get("engines")]
        if eng_rows:
            info = f["overhead"].get("ort_engines", {})
            lines += [f"ORT CPU engines ({info.get('target', '?')}; `eecompile build --backend onnxruntime`) against "
                      "the portable chain, paired in the same rounds:", "",
                      "| model | batch | engines / portable chain, wall | CPU time | tensors carried blocked |",
                      "|---|---|---|---|---|"]
            for r in eng_rows:
                base = r["model"].replace(" + ORT engines", "")
                carried = ", ".join(c["tensor"] for c in info.get("carried", {}).get(base, [])) or "-"
                lines.append(f"| {base} | {r['batch']} | {_r(r['vs_portable'])} | {_r(r['cpu_vs_portable'])} | "
                             f"{carried} |")
            lines.append("")
    if "speedup" in f:
        s = f["speedup"]
        lines += ["### Speedup: digits demo at calibrated thresholds, batch 1", ""]
        if not s.get("measured"):
            lines += [f"Not measured: {s.get('reason')}", ""]
        else:
            lines += ["| samples | accuracy drop | exit shares | measured speedup | oracle speedup | calibration estimate |",
                      "|---|---|---|---|---|---|",
                      f"| {s['samples']} | {s['drop']:+.4f} (budget {s['max_drop']}) | "
                      f"{', '.join(f'{v:.1%}' for v in s['exit_share'])} | {_r(s['speedup'], 'x', 2)} | "
                      f"{_r(s['oracle_speedup'], 'x', 2)} | {s['calibration_estimate'] or 0:.2f}x |", ""]
    if "compaction" in f:
        c = f["compaction"]
        lines += [f"### Compaction: batch {c['batch']}, exits {c['exit_counts']} ({c['model']})", "",
                  "| chain | compact / wait-all speedup | CPU time | ideal (FLOPs) | compact vs unsplit | "
                  "wait-all vs unsplit | throughput compact / wait-all / unsplit (samples/s) | target >= 1.6 |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| portable segments | {_r(c['compact_vs_wait_all'], 'x', 2)} | "
                  f"{_r(c['compact_vs_wait_all_cpu'], 'x', 2) if 'compact_vs_wait_all_cpu' in c else '-'} | "
                  f"{c['ideal_compact_vs_wait_all'] or 0:.2f}x | {_r(c['compact_vs_unsplit'], 'x', 2)} | "
                  f"{_r(c['wait_all_vs_unsplit'], 'x', 2)} | {c['throughput']['compact']:.1f} / "
                  f"{c['throughput']['wait-all']:.1f} / {c['throughput']['unsplit']:.1f} | {_ok(c['holds'])} |"]
        e = c.get("engines")
        if e:
            lines.append(f"| ORT engines ({e['target']}) | {_r(e['compact_vs_wait_all'], 'x', 2)} | "
                         f"{_r(e['compact_vs_wait_all_cpu'], 'x', 2)} | {c['ideal_compact_vs_wait_all'] or 0:.2f}x | "
                         f"{_r(e['compact_vs_unsplit'], 'x', 2)} | - | {e['throughput']['compact']:.1f} / "
                         f"{e['throughput']['wait-all']:.1f} / {c['throughput']['unsplit']:.1f} | "
                         f"{_ok(e['compact_vs_wait_all']['median'] >= 1.6)} |")
        lines.append("")
        if c.get("segment_ms"):
            lines += ["Per segment step, ms (median of `RunResult.timings` over the timed calls; a compact step "
                      "includes its gather):", "", "| run | " + " | ".join(
                          f"seg {k}" for k in range(len(next(iter(c['segment_ms'].values()))))) + " | sum |",
                      "|---|" + "---|" * (len(next(iter(c['segment_ms'].values()))) + 1)]
            for k, v in c["segment_ms"].items():
                lines.append(f"| {k} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {sum(v):.1f} |")
            lines.append("")
    if "compile" in f:
        c = f["compile"]
        lines += [f"### Compile: {c['model']}, {c['exits']} exits (target <= 5 s)", "",
                  f"{_r(c['seconds'], ' s', 2)} over {c['runs']} runs ({c['seconds_without_verify']:.2f} s without "
                  f"the verify pass); peak RSS {c['peak_rss_mb']:.0f} MB ({c['delta_rss_mb']:+.0f} MB over the "
                  f"imports): {_ok(c['holds'])}.", "",
                  "| exits | seconds | peak RSS MB | over imports MB |", "|---|---|---|---|"]
        for r in c["by_exits"]:
            lines.append(f"| {r['exits']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['delta_rss_mb']:.0f} |")
        lines += ["", "| model (4 exits) | parameters | seconds | peak RSS MB | over imports MB |",
                  "|---|---|---|---|---|"]
        for r in c["by_size"]:
            lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f} M | {r['seconds']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['delta_rss_mb']:.0f} |")
        lines.append("")
    if "hop" in f:
        h = f["hop"]
        lines += [f"### Segment hop cost: {h['model']}, batch {h['batch']}", "",
                  f"Per extra segment: {_r(h['per_hop_us'], ' us', 1)}; unsplit model {_r(h['unsplit_us'], ' us', 1)}.",
                  "", "| segments | chain us |", "|---|---|"]
        for k, v in h["chain_us"].items():
            lines.append(f"| {k.split()[0]} | {_r(v, '', 1)} |")
        lines.append("")
    if "fixed" in f:
        fx = f["fixed"]
        ti = fx["tiny"]
        load = fx.get("load_average", {})
        lines += [f"### Runner fixed cost: {ti['model']}, batch {ti['batch']} (load average before "
                  f"{load.get('before')}, after {load.get('after')})", "",
                  f"CPU time, ORT on one thread. Runner time outside ONNX Runtime's compiled run: "
                  f"**{_r(ti['runner_per_segment_us'], ' us', 1)} per "
                  f"segment, {_r(ti['runner_per_call_us'], ' us', 1)} per call** (targets 20 / 50 us; "
                  f"{_ok(ti['holds'])}); chain minus unsplit: {_r(ti['hop_vs_unsplit_us'], ' us', 1)} per segment. "
                  f"Unsplit model {_r(ti['unsplit_us'], ' us', 1)}.", "",
                  "| segments | chain us (CPU) | in ORT us | outside ORT us | chain us (wall) |", "|---|---|---|---|---|"]
        for k, v in ti["chain_us"].items():
            lines.append(f"| {k.split()[0]} | {_r(v, '', 1)} | {_r(ti['ort_us'][k], '', 1)} | "
                         f"{_r(ti['outside_ort_us'][k], '', 1)} | {_r(ti['chain_wall_us'][k], '', 1)} |")
        lines.append("")
        d = fx["digits"]
        if d.get("measured") is False:
            lines += [f"Digits never-exit ratio not measured: {d.get('reason')}", ""]
        else:
            lines += [f"Digits demo model, batch 1, {d['samples']} samples per block, {d['rounds']} rounds "
                      f"(no-exit path vs segments: max abs difference {d['max_abs_diff_no_exit_vs_segments']:.1e}):", "",
                      "| call | us per sample | / unsplit, wall | / unsplit, CPU |", "|---|---|---|---|",
                      f"| unsplit model | {_r(d['us_per_sample']['unsplit'], '', 1)} | 1 | 1 |"]
            for k, v in d["vs_unsplit"].items():
                lines.append(f"| runner, {k} | {_r(d['us_per_sample'][k], '', 1)} | {_r(v)} | "
                             f"{_r(d['cpu_vs_unsplit'][k])} |")
            lines += ["", f"Never-exit target <= {d['target']}x: {_ok(d['holds'])}.", ""]
    if "papers" in f:
        pp = f["papers"]
        lines += [f"### eecompile vs the papers' way (PyTorch {pp['torch']} eager, {pp['torch_threads']} threads; "
                  f"ORT CPU engines {pp['target']})", "",
                  "Same weights, heads, `max_prob` thresholds and exits; speedup = other / eecompile (compact).", "",
                  "| model | batch | against | eecompile ms | other ms | speedup, wall | CPU time | exits agree | "
                  "exit shares |", "|---|---|---|---|---|---|---|---|---|"]
        for r in pp["rows"]:
            agree = r["exits_agree"]["torch_if" if r["batch"] == 1 else "torch_wait_all"]
            lines.append(f"| {r['model']} | {r['batch']} | {r['against']} | {_r(r['eecompile_ms'], '', 2)} | "
                         f"{_r(r['other_ms'], '', 2)} | {_r(r['speedup'], 'x', 2)} | {_r(r['cpu_speedup'], 'x', 2)} | "
                         f"{agree:.1%} | {', '.join(f'{v:.0%}' for v in r['exit_shares'])} |")
        lines.append("")
    if "auto" in f:
        a = f["auto"]
        lines += ["### `eecompile auto` on digits vs the demo's hand-placed exits (budget 1%, batch 1)", ""]
        if a.get("measured") is False:
            lines += [f"Not measured: {a.get('reason')}", ""]
        else:
            lines += ["| placement | exits | measured speedup (calibrate) | drop on calibration data | exit shares |",
                      "|---|---|---|---|---|"]
            rows = [("auto (chosen)", a["chosen"])] + [("auto, also compiled", c) for c in a["verified"]
                                                        if c["exits"] != a["chosen"]["exits"]]
            if a.get("hand_placed"):
                rows.append(("hand-placed (demo)", a["hand_placed"]))
            for tag, c in rows:
                lines.append(f"| {tag} | {', '.join(c['exits'])} | {c['measured_speedup']:.2f}x | "
                             f"{c['measured_drop']:+.4f} | {', '.join(f'{v:.0%}' for v in c['exit_shares'] or [])} |")
            t = a.get("test")
            if t:
                lines += ["", f"Test split ({t['samples']} digits) on the bundle auto wrote: accuracy "
                              f"{t['accuracy']:.4f}, exit shares {', '.join(f'{v:.0%}' for v in t['exit_shares'])}."]
            lines.append("")
    if results.get("errors"):
        lines += ["### Errors", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()] + [""]
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """One PNG per figure that has data; none when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plots")
        return []
    f = results["figures"]
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out / f"{stem}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    def bars(ax: Any, labels: list[str], stats: list[dict[str, Any]], line: float | None, title: str) -> None:
        med = [s["median"] for s in stats]
        err = [[m - s["min"] for m, s in zip(med, stats, strict=True)],
               [s["max"] - m for m, s in zip(med, stats, strict=True)]]
        ax.bar(labels, med, yerr=err, capsize=4, color="#4c72b0")
        if line is not None:
            ax.axhline(line, color="#c44e52", ls="--", lw=1)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)

    if "overhead" in f:
        rows = f["overhead"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 3))
        bars(ax, [f"{r['model']}\nB={r['batch']}" for r in rows], [r["ratio"] for r in rows], 1.02,
             "chain (no exit) / unsplit, wall time (target 1.02)")
        save(fig, "overhead")
    if "compaction" in f:
        c = f["compaction"]
        fig, ax = plt.subplots(figsize=(5, 3))
        bars(ax, ["compact vs\nwait-all", "compact vs\nunsplit", "wait-all vs\nunsplit"],
             [c["compact_vs_wait_all"], c["compact_vs_unsplit"], c["wait_all_vs_unsplit"]], 1.6,
             f"speedup, batch {c['batch']}, exits {c['exit_counts']}")
        save(fig, "compaction")
    if "compile" in f:
        c = f["compile"]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        ex = c["by_exits"]
        axes[0].plot([r["exits"] for r in ex], [r["seconds"] for r in ex], "o-", label="seconds")
        ax2 = axes[0].twinx()
        ax2.plot([r["exits"] for r in ex], [r["peak_rss_mb"] for r in ex], "s--", color="#dd8452", label="peak MB")
        axes[0].set_xlabel("exits")
        axes[0].set_ylabel("seconds")
        ax2.set_ylabel("peak RSS MB")
        axes[0].set_title(f"compile {c['model']}", fontsize=9)
        sz = c["by_size"]
        axes[1].plot([r["parameters"] / 1e6 for r in sz], [r["seconds"] for r in sz], "o-")
        ax3 = axes[1].twinx()
        ax3.plot([r["parameters"] / 1e6 for r in sz], [r["peak_rss_mb"] for r in sz], "s--", color="#dd8452")
        axes[1].set_xlabel("parameters (M), 4 exits")
        axes[1].set_title("compile vs model size", fontsize=9)
        save(fig, "compile")
    if "hop" in f:
        h = f["hop"]
        fig, ax = plt.subplots(figsize=(5, 3))
        segs = [int(k.split()[0]) for k in h["chain_us"]]
        ax.plot(segs, [v["median"] for v in h["chain_us"].values()], "o-", label="chain")
        ax.axhline(h["unsplit_us"]["median"], color="#c44e52", ls="--", lw=1, label="unsplit")
        ax.set_xlabel("segments")
        ax.set_ylabel("us per call, batch 1")
        ax.legend(fontsize=8)
        ax.set_title(f"segment hop: {h['per_hop_us']['median']:.1f} us each", fontsize=9)
        save(fig, "hop")
    return written


def write(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """``{stem}.json``, ``{stem}.md`` and the plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{stem}.json"
    js.write_text(json.dumps(results, indent=1) + "\n")
    md = out / f"{stem}.md"
    md.write_text(markdown(results) + "\n")
    return [js, md, *plots(results, out, stem)]
