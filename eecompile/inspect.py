"""``eecompile inspect``: what a bundle holds, as a JSON-able dict or as rich tables.

A damaged bundle is still described (that is when people inspect one): file hash mismatches are listed
under ``problems`` instead of refusing to load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eecompile.bundle import Bundle, TensorInfo
from eecompile.errors import BundleError
from eecompile.runtimes.base import FIRES_BELOW


def _tensor(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "batch_axis": t.batch_axis}


def describe_bundle(path: str | Path) -> dict[str, Any]:
    """Everything a person or a script wants to know about a bundle, as plain JSON types."""
    bundle = Bundle.load(path, verify=False)
    m = bundle.manifest
    problems: list[str] = []
    for rel in m.files:
        try:
            bundle.verify_file(rel)
        except BundleError as e:
            problems.append(str(e))
    input_names = {t.name for t in m.inputs}
    segments = []
    for seg in m.segments:
        out_info = {t.name: t for t in seg.outputs}
        gate = seg.exit.gate
        segments.append({
            "index": seg.index,
            "file": seg.file,
            "flops": seg.flops,
            "flops_fraction": seg.flops_fraction,
            "model_inputs": [t.name for t in seg.inputs if t.name in input_names],
            "carried_in": [_tensor(t) for t in seg.inputs if t.name not in input_names],
            "carried_out": [_tensor(out_info[n]) if n in out_info else {"name": n} for n in seg.carried_out],
            "exit": {
                "index": seg.exit.index,
                "name": seg.exit.name,
                "at": list(seg.exit.at),
                "head": seg.exit.head,
                "outputs": dict(seg.exit.outputs),
                "final": gate is None and seg.index == len(m.segments) - 1,
                "jump": next(({"tensor": j["tensor"], "to": j["to"]} for j in m.jumps or [] if j["exit"] == seg.index),
                             None),
            },
            "gate": None if gate is None else {
                "kind": gate.kind, "threshold": gate.threshold, "output": gate.output,
                "threshold_input": gate.threshold_input, "score_output": getattr(gate, "score_output", None),
                "state": list(gate.state_outputs),
            },
        })
    return {
        "path": str(bundle.path),
        "format_version": m.format_version,
        "eecompile_version": m.eecompile_version,
        "source_model": dict(m.source_model),
        "batch_mode": m.batch_mode,
        "batch": ("any batch size (dynamic)" if m.batch_mode == "dynamic"
                  else "one sample at a time (per_sample: the graph only runs at batch 1)"),
        "inputs": [_tensor(t) for t in m.inputs],
        "outputs": [_tensor(t) for t in m.outputs],
        "end_only": list(m.end_only),  # final outputs absent for samples that leave early
        "class_axis": m.class_axis,
        "task": m.task,
        "n_early_exits": m.n_early_exits,
        "thresholds": m.thresholds,
        "segments": segments,
        "calibration": m.calibration,
        "engines": list(m.engines),
        "engine_cache": _engine_cache(m),  # engines kept outside the bundle for this machine, or None
        "heads": dict(m.heads),
        "notes": list(m.notes),
        "problems": problems,
        "loop": m.loop,
        "jumps": m.jumps,
        "decoder": None if m.decoder is None else _describe_decoder(bundle, m.decoder),
    }


def _describe_decoder(bundle: Bundle, dec: dict[str, Any]) -> dict[str, Any]:
    """A decoder bundle's (``kind: decoder``) segments, shared head and exits. Each segment: its layers (the
    half-open range ``[first, last)``), its key/value cache tensors as its graph reads (``kv_inputs``) and writes
    (``kv_outputs``) them, and how the cache is updated: ``in-place`` (``kv_update: tensor_scatter``, ONNX
    Runtime writes only the new positions into the runner's buffers) or ``concat`` (the exported ``Concat``
    cache, a new copy per call). Each exit: where it is, its gate, its draft length and its trained draft head
    (None while untrained)."""
    import onnx

    from eecompile.runtimes.lm import IN_PLACE

    segments = []
    for i, seg in enumerate(dec.get("segments") or []):
        kv_in: list[str] | None = None
        kv_out: list[str] | None = None
        try:  # the graph's own names; a damaged file is listed under problems, not described here
            g = onnx.load(str(bundle.path / seg["file"]), load_external_data=False).graph
            plain = {*seg.get("inputs", []), seg.get("hidden_in"), seg.get("hidden_out")}
            kv_in = [t.name for t in g.input if t.name not in plain]
            kv_out = [t.name for t in g.output if t.name not in plain]
        except Exception:  # noqa: BLE001  (onnx raises DecodeError, OSError, ...: any means unreadable)
            pass
        segments.append({"index": i, "file": seg["file"], "layers": list(seg["layers"]),
                         "hidden_in": seg.get("hidden_in"), "hidden_out": seg.get("hidden_out"),
                         "inputs": list(seg.get("inputs") or []), "kv_inputs": kv_in, "kv_outputs": kv_out,
                         "kv_cache": "in-place" if seg.get("kv_update") == IN_PLACE else
                         "recurrent" if seg.get("kv_update") == "recurrent" else "concat",
                         "propagate": seg.get("propagate")})
    exits = [{"index": k, "after_layer": e.get("after_layer"), "at": e.get("at"), "segment": e.get("segment"),
              "gate": dict(e.get("gate") or {}), "draft_tokens": e.get("draft_tokens"),
              "draft_head": e.get("draft_head")} for k, e in enumerate(dec.get("exits") or [])]
    return {"layers": dec.get("layers"), "vocab": dec.get("vocab"), "hidden_size": dec.get("hidden_size"),
            "max_length": dec.get("max_length"), "kv": dict(dec.get("kv") or {}),
            "state": dict(dec["state"]) if dec.get("state") else None, "segments": segments,
            "head": dict(dec.get("head") or {}), "exits": exits, "eos_token_id": dec.get("eos_token_id"),
            "tokenizer": dec.get("tokenizer"), "calibration": sorted((dec.get("calibration") or {}).keys())}


def _engine_cache(manifest: Any) -> str | None:
    """The user-cache directory holding ONNX Runtime CPU engines for this bundle's segments on this machine
    (``eecompile build BUNDLE --cache``), or None when there is none."""
    from eecompile.runtimes.onnxruntime import ENGINE_CACHE_INDEX, engine_cache_dir

    root = engine_cache_dir(manifest)
    return str(root) if (root / ENGINE_CACHE_INDEX).is_file() else None


def _shape(t: dict[str, Any]) -> str:
    dims = ["B" if i == t.get("batch_axis") else str(d) for i, d in enumerate(t.get("shape", []))]
    return f"{t['name']} [{', '.join(dims)}]" + (" (no batch axis)" if t.get("batch_axis") is None else "")


def print_bundle(path: str | Path) -> dict[str, Any]:
    """Print :func:`describe_bundle` as tables; returns the description."""
    from rich.table import Table

    from eecompile.console import report_console

    d = describe_bundle(path)
    console = report_console()
    if not console.is_terminal:
        console = report_console(width=160)  # piped or captured: don't squeeze the tables into 80 columns
    console.print(f"{d['path']}  format v{d['format_version']}, eecompile {d['eecompile_version'] or '?'}")
    src = d["source_model"]
    console.print(f"source model: {src.get('file', '?')} (sha256 {str(src.get('sha256', '?'))[:12]})")
    console.print(f"batch: {d['batch']}")
    if d["task"] == "regression":
        console.print("task: regression (no class axis: gates score/saturation/change/q_exit; calibrate with "
                      "--error-budget)")
    console.print("inputs:  " + ", ".join(f"{_shape(t)} {t['dtype']}" for t in d["inputs"]))
    console.print("outputs: " + ", ".join(f"{_shape(t)} {t['dtype']}"
                                          + (" (final exit only)" if t["name"] in d["end_only"] else "")
                                          for t in d["outputs"]))

    if d["decoder"] is not None:
        _print_decoder(console, d["decoder"])
    else:
        _print_segments(console, d)
    if d["loop"]:
        lp = d["loop"]
        gate = lp.get("gate")
        console.print(f"loop: {lp['steps']} steps by default (run --steps N); fed back: "
                      + ", ".join(f"{f['output']} -> {f['input']}" for f in lp["feedback"])
                      + "; per step: " + (", ".join(f"{s['input']} ({s['source']})" for s in lp.get("step_inputs") or [])
                                          or "-")
                      + (f"; gate {gate['kind']} {_loop_threshold(gate)}" if gate else "; no gate")
                      + (f"; commit {lp['commit']}" if lp.get("commit") else ""))

    if d["calibration"]:
        _print_calibration(console, d["calibration"])
    if d["engines"]:
        eng = Table(title="engines (`inspect --json` has every field)")
        for col in ("seg", "backend", "target", "version", "device", "file", "sha256", "flags"):
            eng.add_column(col)
        for e in d["engines"]:
            flags = e.get("flags") or {}
            simple = ", ".join(f"{k}={v}" for k, v in flags.items() if isinstance(v, (bool, int, float, str)))
            eng.add_row(str(e.get("segment", "")), str(e.get("backend", "")), str(e.get("target", "")),
                        str(e.get("backend_version") or e.get("trt_version") or ""),
                        str(e.get("gpu_name") or "cpu"), str(e.get("file") or "-"),
                        str(e.get("sha256") or "")[:12], simple)
        console.print(eng)
    elif not d["engine_cache"]:
        console.print("engines: none built (ONNX Runtime runs the portable segments)")
    if d["engine_cache"]:
        console.print(f"engines outside the bundle (`build --cache`) for this machine: {d['engine_cache']} (used when "
                      "the bundle has none for this machine, after their sha256 is checked)")
    for note in d["notes"]:
        console.print(f"note: {note}")
    for problem in d["problems"]:
        console.print(f"problem: {problem}", style="red")
    return d


def _layers(r: list[int]) -> str:
    """A half-open layer range [first, last) as the layers it holds ("0-1")."""
    return f"{r[0]}-{r[1] - 1}" if r[1] - r[0] > 1 else str(r[0])


def _names(names: list[str] | None) -> str:
    if names is None:
        return "? (file unreadable)"
    if len(names) <= 4:
        return "\n".join(names) or "-"
    return f"{len(names)}: {names[0]}\n... {names[-1]}"


def _print_decoder(console: Any, dec: dict[str, Any]) -> None:
    from rich.table import Table

    kv, state = dec["kv"], dec.get("state")
    what = (f"a recurrent state per layer {state.get('parts')} ({state.get('dtype')}; no cache), at most "
            f"{dec['max_length']} positions" if state else
            f"cache of {dec['max_length']} positions ({kv.get('heads')} KV heads x {kv.get('head_dim')}, "
            f"{kv.get('dtype')})")
    console.print(f"decoder: {dec['layers']} layers, vocabulary {dec['vocab']}, hidden {dec['hidden_size']}, "
                  f"{what}; generate with `eecompile generate`")
    owns = "recurrent state" if state else "KV cache"
    table = Table(title=f"decoder segments (each owns the {owns} of its layers)")
    for col in ("seg", "file", "layers", "hidden in -> out", f"{owns} in", f"{owns} out",
                "update" if state else "cache update"):
        table.add_column(col, justify="right" if col == "seg" else "left")
    updates = {"in-place": "in place (TensorScatter)", "recurrent": "state per row", "concat": "Concat (copy per call)"}
    for s in dec["segments"]:
        table.add_row(str(s["index"]), s["file"], _layers(s["layers"]),
                      f"{s['hidden_in'] or ', '.join(s['inputs'])} -> {s['hidden_out']}",
                      _names(s["kv_inputs"]), _names(s["kv_outputs"]), updates[s["kv_cache"]])
    console.print(table)
    head = dec["head"]
    console.print(f"head: {head.get('file')} ({head.get('input')} -> {', '.join(head.get('outputs') or [])}; "
                  f"shared by every exit and the final layer)")
    if dec["exits"]:
        ex = Table(title="exits")
        for col in ("exit", "after layer", "seg", "at", "gate", "threshold", "draft tokens", "draft head"):
            ex.add_column(col)
        for e in dec["exits"]:
            gate, dh = e["gate"], e["draft_head"]
            thr = gate.get("threshold")
            ex.add_row(str(e["index"]), str(e["after_layer"]), str(e["segment"]), str(e["at"]),
                       str(gate.get("kind", "-")), f"{thr:.4g}" if isinstance(thr, (int, float)) else "-",
                       str(e["draft_tokens"] or "-"),
                       "untrained (the shared head drafts)" if not dh else
                       f"{dh.get('file')}: {dh.get('vocab')} tokens, agreement {dh.get('agreement', 0):.1%}"
                       + (f"\nattention adapter {dh['adapter_segment'].get('file')} (own KV cache)"
                          if dh.get("adapter_segment") else ""))
        console.print(ex)
    else:
        console.print("exits: none (the full model only)")
    propagate = [s["propagate"] for s in dec["segments"] if s.get("propagate")]
    if propagate:
        console.print(f"exit mode state propagation (--exit-fill propagate): {', '.join(propagate)}")
    if dec["calibration"]:
        console.print("decoder calibration: " + ", ".join(dec["calibration"]))


def _print_segments(console: Any, d: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="segments")
    for col in ("seg", "file", "FLOPs", "carried in", "carried out", "exit head", "gate", "threshold"):
        table.add_column(col, justify="right" if col in ("seg", "FLOPs", "threshold") else "left")
    for s in d["segments"]:
        gate = s["gate"]
        table.add_row(
            str(s["index"]), s["file"], f"{100 * s['flops_fraction']:.1f}%",
            "\n".join([_shape(t) for t in s["carried_in"]]
                      + ([f"{', '.join(s['model_inputs'])} (model input)"] if s["index"] and s["model_inputs"] else []))
            or "-",
            "\n".join(_shape(t) if "shape" in t else t["name"] for t in s["carried_out"]) or "-",
            s["exit"]["head"] + (" (final)" if s["exit"]["final"] else "")
            + (f" -> seg {s['exit']['jump']['to']}" if s["exit"].get("jump") else ""),
            gate["kind"] if gate else "-",
            _threshold(gate["threshold"], gate["kind"]) if gate else "-",
        )
    console.print(table)


def _threshold(value: float, kind: str) -> str:
    """Thresholds of +-inf are how calibration writes "this exit never fires": +inf for gates that fire at or above
    the threshold, -inf for those that fire at or below it (entropy, change)."""
    if value in (float("inf"), float("-inf")):
        fires_above = kind not in FIRES_BELOW
        return "never" if (value > 0) == fires_above else "always"
    return f"{value:.4g}"


def _loop_threshold(gate: dict[str, Any]) -> str:
    """A loop gate's threshold; a staged one as ``[early, ..., late] (staged)``."""
    t = gate["threshold"]
    if isinstance(t, list):
        return "[" + ", ".join(_threshold(v, gate["kind"]) for v in t) + "] (staged)"
    return _threshold(t, gate["kind"])


def _print_calibration(console: Any, cal: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"calibration ({cal.get('method', '?')}, max drop {cal.get('max_drop')}, "
                        f"{cal.get('n_samples', '?')} samples, {cal.get('backend', '?')} batch {cal.get('batch_size', '?')})")
    loop = "mean_steps" in cal  # a loop gate's calibration (eecompile.calibrate.loop): its rows are steps
    within = "within error budget" if cal.get("error_budget") is not None else "agreement w/ all steps"
    cols = (("stop after", "gate", "threshold", "share stopping", f"{within} of those stopping", "cumulative ms")
            if loop else ("exit", "gate", "threshold", "share exiting", "accuracy of those exiting", "cumulative ms"))
    for col in cols:
        table.add_column(col, justify="left" if col in ("exit", "stop after", "gate") else "right")
    for e in cal.get("exits") or []:
        thr = e.get("threshold")
        table.add_row(str(e.get("name") or e.get("index")), str(e.get("gate") or "final"),
                      _threshold(thr, str(e.get("gate"))) if isinstance(thr, (int, float)) else "-",
                      f"{e.get('share', 0):.1%}",
                      f"{e['accuracy']:.4f}" if isinstance(e.get("accuracy"), (int, float)) else "-",
                      f"{e['cumulative_ms']:.4f}" if isinstance(e.get("cumulative_ms"), (int, float)) else "-")
    console.print(table)
    parts = []
    if loop and isinstance(cal.get("accuracy"), (int, float)):
        parts.append(f"{cal.get('mean_steps', 0):.2f} of {cal.get('steps')} steps on average; {within} "
                     f"{cal['accuracy']:.4f}")
    elif isinstance(cal.get("full_accuracy"), (int, float)) and isinstance(cal.get("accuracy"), (int, float)):
        parts.append(f"accuracy {cal['full_accuracy']:.4f} -> {cal['accuracy']:.4f} (drop {cal.get('drop', 0):+.4f}, "
                     f"against {cal.get('reference', '?')})")
    if isinstance(cal.get("expected_speedup"), (int, float)):
        parts.append(f"expected speedup {cal['expected_speedup']:.2f}x vs {cal.get('baseline', '?')}")
    if isinstance(cal.get("oracle_speedup"), (int, float)):
        parts.append(f"oracle {cal['oracle_speedup']:.2f}x")
    if cal.get("certified") is not None:
        parts.append("certified" if cal["certified"] else "NOT certified")
    if parts:
        console.print("calibration: " + "; ".join(parts))
