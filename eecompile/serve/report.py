"""``eecompile report``: one self-contained HTML page showing what a deployed bundle does.

The page holds the segments and their share of the FLOPs, the tensors carried between segments, the gates and
their thresholds, the calibration's accuracy-speedup (Pareto) curve and exit histogram (from
``manifest.calibration``), and per-segment latency measured here on ONNX Runtime. Figures are inline SVG drawn
from the numbers (no script, no font, no network: the page renders the same offline, in any browser).
"""

from __future__ import annotations

import html
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, TensorInfo
from eecompile.errors import DataError

W, H, PAD = 560, 260, 48  # figure size and margin, px
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def measure_segments(bundle: Bundle, data: str | Path | None = None, batch: int = 1, repeats: int = 10,
                     backend: str = "onnxruntime") -> dict[str, Any] | None:
    """Median seconds per segment step over ``repeats`` runs of every segment (policy "never") at ``batch``.

    Inputs come from ``data`` (an .npz named after the model inputs), else random values when every non-batch
    dimension is fixed; None when neither is possible. A loop bundle's segments are those of one step (its
    per-step inputs random, the others from ``data``). Raises DataError for a bad .npz or batch."""
    from eecompile import load
    from eecompile.runtimes.data import batch_size_of, load_npz

    if batch < 1 or repeats < 1:
        raise DataError(f"--batch and --repeats must be >= 1, got {batch} and {repeats}")
    m = bundle.manifest
    # A loop bundle: the segments of one step, its per-step inputs (filled by the loop at run time) random.
    per_step = {s["input"] for s in (m.loop or {}).get("step_inputs") or []}
    given = [t for t in m.inputs if t.name not in per_step]
    if data is not None:
        feeds = load_npz(data, given).slice(0, batch)
        n = batch_size_of(feeds, given, str(data)) if feeds else batch
        filled = _random_feeds([t for t in m.inputs if t.name in per_step], n)
    else:
        feeds, filled = _random_feeds(given, batch), _random_feeds([t for t in m.inputs if t.name in per_step], batch)
    if feeds is None or filled is None:
        return None
    feeds = {**feeds, **filled}
    if m.loop is not None:
        from dataclasses import replace

        from eecompile.runtimes.chain import EarlyExitRunner

        opened: Any = EarlyExitRunner(Bundle(bundle.path, replace(m, loop=None)), backend=backend)
    else:
        opened = load(bundle.path, backend=backend)
    with opened as runner:
        runner.run(feeds, policy="never")  # warm-up: first runs allocate
        runs = [runner.run(feeds, policy="never").timings for _ in range(repeats)]
    per_segment = [statistics.median(float(r[k]) for r in runs) for k in range(len(m.segments))]
    n = batch_size_of(feeds, m.inputs, "report") if feeds else batch  # along each input's batch axis
    return {"backend": backend, "batch": n, "repeats": repeats, "inputs": "data" if data else "random",
            "seconds": per_segment}


def _random_feeds(inputs: Sequence[TensorInfo], batch: int) -> dict[str, np.ndarray] | None:
    rng = np.random.default_rng(0)
    feeds = {}
    for t in inputs:
        dims = [batch if i == t.batch_axis else d for i, d in enumerate(t.shape)]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        shape = [int(d) for d in dims]  # type: ignore[arg-type]  # checked just above
        dtype = np.dtype(t.dtype)
        feeds[t.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                         else rng.integers(0, 2, size=shape).astype(dtype))
    return feeds


def write_report(bundle_path: str | Path, output: str | Path, data: str | Path | None = None, batch: int = 1,
                 repeats: int = 10) -> Path:
    """Write the report page for a bundle to ``output`` (atomically) and return its path."""
    bundle = Bundle.load(bundle_path)
    latency = None if bundle.manifest.decoder else measure_segments(bundle, data, batch, repeats)
    page = render(bundle, latency)
    output = Path(output)
    if not output.parent.is_dir():
        raise DataError(f"{output.parent}: directory does not exist; create it or choose another -o path")
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{output}: cannot write the report ({e.strerror or e}); choose another -o path") from e
    return output


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _shape(t: TensorInfo) -> str:
    return "[" + ", ".join("B" if i == t.batch_axis else str(d) for i, d in enumerate(t.shape)) + "]"


def render(bundle: Bundle, latency: dict[str, Any] | None) -> str:
    """The page as a string (see the module docstring for what it holds)."""
    m = bundle.manifest
    if m.decoder:
        return _page(bundle, [_overview(bundle), _decoder_table(m.decoder)])
    names = [s.exit.name or (f"exit {s.index}" if s.exit.gate else "final") for s in m.segments]
    sections = [_overview(bundle), _segments_table(bundle, names)]
    sections.append(_figure("flops", "Share of the FLOPs per segment",
                            _bars(names, [s.flops_fraction for s in m.segments], "share of FLOPs", percent=True)))
    cal = m.calibration
    if cal and cal.get("curve"):
        sections.append(_figure("pareto", "Calibration: accuracy against speedup",
                                _pareto(cal), _calibration_note(cal)))
    else:
        sections.append("<section id='pareto'><h2>Calibration</h2><p>Not calibrated: run "
                        "<code>eecompile calibrate BUNDLE --data CAL.npz --max-drop 0.01</code>.</p></section>")
    if cal and cal.get("exits"):
        shares = [float(e.get("share", 0.0)) for e in cal["exits"]]
        rows = [str(e.get("name") or names[min(i, len(names) - 1)]) for i, e in enumerate(cal["exits"])]
        title = "After which step samples stop" if m.loop else "Where samples exit"  # a loop's rows are its steps
        sections.append(_figure("exits", f"{title} (calibration set)",
                                _bars(rows, shares, "share of samples", percent=True)))
    if latency is not None:
        ms = [1000.0 * s for s in latency["seconds"]]
        note = (f"Median of {latency['repeats']} runs on {_e(latency['backend'])}, batch {latency['batch']}, "
                f"{latency['inputs']} inputs, every segment run (policy never); total {sum(ms):.3f} ms.")
        sections.append(_figure("latency", "Measured latency per segment", _bars(names, ms, "ms"), note))
    else:
        sections.append("<section id='latency'><h2>Measured latency per segment</h2><p>Not measured: the inputs "
                        "have symbolic dimensions; pass <code>--data IN.npz</code>.</p></section>")
    return _page(bundle, sections)


def _page(bundle: Bundle, sections: list[str]) -> str:
    title = f"eecompile report: {bundle.path.name}"
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n")


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:70em;color:#222}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}"
        "th{background:#f4f4f4}code{background:#f4f4f4;padding:0 .2em}figure{margin:1em 0}"
        "figcaption{font-size:.9em;color:#555}svg text{font-family:sans-serif;font-size:11px}")


def _overview(bundle: Bundle) -> str:
    m = bundle.manifest
    rows = [("source model", f"{m.source_model.get('file', '?')} (sha256 {str(m.source_model.get('sha256', ''))[:12]})"),
            ("eecompile", f"{m.eecompile_version} (bundle format {m.format_version})"),
            ("batch", m.batch_mode),
            ("inputs", ", ".join(f"{t.name} {t.dtype}{_shape(t)}" for t in m.inputs)),
            ("outputs", ", ".join(f"{t.name} {t.dtype}{_shape(t)}" for t in m.outputs)),
            ("exits", f"{m.n_early_exits} early + final"),
            ("engines", ", ".join(f"{e.get('backend')}/{e.get('target', '')}" for e in m.engines) or "none built")]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<section id='overview'><h2>Bundle</h2><table>{body}</table></section>"


def _decoder_table(dec: dict[str, Any]) -> str:
    """A decoder bundle: layer segments (each owning its layers' key/value cache), the shared head, the exits."""
    head = "<tr><th>segment</th><th>file</th><th>layers</th><th>reads</th><th>hidden out</th></tr>"
    rows = [f"<tr><td>{k}</td><td>{_e(seg.get('file'))}</td><td>{_e(seg.get('layers'))}</td>"
            f"<td>{_e(', '.join(seg.get('inputs') or []) or seg.get('hidden_in') or '-')}</td>"
            f"<td>{_e(seg.get('hidden_out') or '-')}</td></tr>" for k, seg in enumerate(dec.get("segments", []))]
    exits = "".join(f"<tr><td>{i}</td><td>after layer {_e(e.get('after_layer'))}</td><td>{_e(e.get('at'))}</td>"
                    f"<td>{_e((e.get('gate') or {}).get('kind'))}</td>"
                    f"<td>{_e((e.get('gate') or {}).get('threshold'))}</td><td>{_e(e.get('draft_tokens'))}</td></tr>"
                    for i, e in enumerate(dec.get("exits", [])))
    cache = (f"recurrent state per layer {(dec.get('state') or {}).get('parts')} (no cache)" if dec.get("state") else
             f"key/value cache of {dec.get('max_length')} positions ({(dec.get('kv') or {}).get('heads')} heads x "
             f"{(dec.get('kv') or {}).get('head_dim')})")
    facts = (f"{dec.get('layers')} layers, hidden size {dec.get('hidden_size')}, vocabulary {dec.get('vocab')}, "
             f"{cache}; shared head {_e((dec.get('head') or {}).get('file'))}")
    return (f"<section id='decoder'><h2>Decoder: layer segments and exits</h2><p>{_e(facts)}</p>"
            f"<table>{head}{''.join(rows)}</table><table><tr><th>exit</th><th>where</th><th>tensor</th>"
            f"<th>gate</th><th>threshold</th><th>draft tokens</th></tr>{exits}</table>"
            "<p>Tokens per second and acceptance per mode: <code>eecompile generate BUNDLE --prompt ... "
            "--json</code>.</p></section>")


def _segments_table(bundle: Bundle, names: list[str]) -> str:
    m = bundle.manifest
    model_inputs = {t.name for t in m.inputs}
    head = ("<tr><th>segment</th><th>FLOPs</th><th>share</th><th>reads</th><th>carries out</th><th>exit head</th>"
            "<th>gate</th><th>threshold</th></tr>")
    rows = []
    for seg, name in zip(m.segments, names, strict=True):
        outs = {t.name: t for t in seg.outputs}
        reads = ", ".join(t.name + ("" if t.name in model_inputs else " " + _shape(t)) for t in seg.inputs)
        carried = ", ".join(f"{n} {_shape(outs[n])}" if n in outs else n for n in seg.carried_out) or "-"
        gate = seg.exit.gate
        where = seg.exit.head + (f" at {', '.join(seg.exit.at)}" if seg.exit.at else "")
        rows.append(f"<tr><td>{seg.index} ({_e(name)})</td><td>{seg.flops:,}</td><td>{seg.flops_fraction:.1%}</td>"
                    f"<td>{_e(reads)}</td><td>{_e(carried)}</td><td>{_e(where)}</td><td>{_e(gate.kind if gate else 'final')}</td>"
                    f"<td>{_threshold(gate.threshold) if gate else '-'}</td></tr>")
    return f"<section id='segments'><h2>Segments, carried tensors and gates</h2><table>{head}{''.join(rows)}</table></section>"


def _threshold(t: float) -> str:
    return "never" if t is None or not math.isfinite(t) else f"{t:.4g}"


def _calibration_note(cal: dict[str, Any]) -> str:
    what = "accuracy" if cal.get("reference") == "labels" else "agreement with the final exit"
    return (f"{_e(cal.get('method'))} calibration on {cal.get('n_samples')} samples, max drop {cal.get('max_drop')}: "
            f"{what} {float(cal.get('accuracy', 0)):.4f} (full model {float(cal.get('full_accuracy', 0)):.4f}), "
            f"expected speedup {float(cal.get('expected_speedup', 0)):.2f}x vs {_e(cal.get('baseline'))} on "
            f"{_e(cal.get('backend'))} (oracle {float(cal.get('oracle_speedup', 0)):.2f}x). Star: the chosen thresholds.")


def _figure(anchor: str, title: str, svg: str, note: str = "") -> str:
    caption = f"<figcaption>{note}</figcaption>" if note else ""
    return f"<section id='{anchor}'><h2>{_e(title)}</h2><figure>{svg}{caption}</figure></section>"


def _svg(body: str, label: str) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' viewBox='0 0 {W} {H}' "
            f"role='img' aria-label='{_e(label)}'>{body}</svg>")


def _axes(y_label: str, y_max: float, percent: bool) -> str:
    parts = [f"<line x1='{PAD}' y1='{H - PAD}' x2='{W - 10}' y2='{H - PAD}' stroke='#333'/>",
             f"<line x1='{PAD}' y1='10' x2='{PAD}' y2='{H - PAD}' stroke='#333'/>",
             f"<text x='12' y='{H / 2}' transform='rotate(-90 12 {H / 2})' text-anchor='middle'>{_e(y_label)}</text>"]
    for i in range(5):
        v = y_max * i / 4
        y = H - PAD - (H - PAD - 10) * i / 4
        text = f"{v:.0%}" if percent else f"{v:.3g}"
        parts.append(f"<text x='{PAD - 4}' y='{y + 4:.1f}' text-anchor='end'>{text}</text>")
        parts.append(f"<line x1='{PAD}' y1='{y:.1f}' x2='{W - 10}' y2='{y:.1f}' stroke='#eee'/>")
    return "".join(parts)


def _bars(labels: Sequence[str], values: Sequence[float], y_label: str, percent: bool = False) -> str:
    top = max([*values, 1e-12]) * 1.1
    step = (W - PAD - 20) / max(len(values), 1)
    parts = [_axes(y_label, top, percent)]
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        h = (H - PAD - 10) * v / top
        x = PAD + 10 + i * step
        text = f"{v:.1%}" if percent else f"{v:.3g}"
        parts.append(f"<rect class='bar' x='{x:.1f}' y='{H - PAD - h:.1f}' width='{step * 0.7:.1f}' "
                     f"height='{h:.1f}' fill='{COLORS[i % len(COLORS)]}'><title>{_e(label)}: {text}</title></rect>")
        parts.append(f"<text x='{x + step * 0.35:.1f}' y='{H - PAD - h - 4:.1f}' text-anchor='middle'>{text}</text>")
        parts.append(f"<text x='{x + step * 0.35:.1f}' y='{H - PAD + 16}' text-anchor='middle'>{_e(label)}</text>")
    return _svg("".join(parts), y_label)


def _pareto(cal: dict[str, Any]) -> str:
    pts = [(float(p["speedup"]), float(p["accuracy"])) for p in cal["curve"]]
    chosen = (float(cal.get("expected_speedup", 0.0)), float(cal.get("accuracy", 0.0)))
    xs = [x for x, _ in pts] + [chosen[0], 1.0]
    ys = [y for _, y in pts] + [chosen[1]]
    x0, x1 = min(xs), max(xs) * 1.05 or 1.0
    y0, y1 = min(ys) - 0.02, max(ys) + 0.02
    if x1 - x0 < 1e-9:
        x1 = x0 + 1
    if y1 - y0 < 1e-9:
        y1 = y0 + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (PAD + (W - PAD - 20) * (x - x0) / (x1 - x0), H - PAD - (H - PAD - 10) * (y - y0) / (y1 - y0))

    parts = [f"<line x1='{PAD}' y1='{H - PAD}' x2='{W - 10}' y2='{H - PAD}' stroke='#333'/>",
             f"<line x1='{PAD}' y1='10' x2='{PAD}' y2='{H - PAD}' stroke='#333'/>",
             f"<text x='{W / 2}' y='{H - 12}' text-anchor='middle'>speedup vs {_e(cal.get('baseline', 'baseline'))}</text>",
             f"<text x='12' y='{H / 2}' transform='rotate(-90 12 {H / 2})' text-anchor='middle'>accuracy</text>"]
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = at(xv, y0)
        _, py = at(x0, yv)
        parts.append(f"<text x='{px:.1f}' y='{H - PAD + 14}' text-anchor='middle'>{xv:.2f}x</text>")
        parts.append(f"<text x='{PAD - 4}' y='{py + 4:.1f}' text-anchor='end'>{yv:.3f}</text>")
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in (at(x, y) for x, y in sorted(pts)))
    parts.append(f"<polyline class='curve' points='{line}' fill='none' stroke='{COLORS[0]}' stroke-width='2'/>")
    for x, y in pts:
        px, py = at(x, y)
        parts.append(f"<circle cx='{px:.1f}' cy='{py:.1f}' r='3' fill='{COLORS[0]}'><title>{x:.2f}x, {y:.4f}"
                     f"</title></circle>")
    cx, cy = at(*chosen)
    parts.append(f"<text class='chosen' x='{cx:.1f}' y='{cy + 6:.1f}' text-anchor='middle' font-size='18' "
                 f"fill='{COLORS[3]}'>&#9733;</text>")
    return _svg("".join(parts), "accuracy against speedup")
