"""A tiny HTTP client for the serving tests and the load benchmark (stdlib only), and process bookkeeping."""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def post(url: str, body: bytes, content_type: str, timeout: float = 60.0) -> tuple[int, bytes, str]:
    """(status, body, content type) of one POST; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def predict_json(url: str, inputs: dict[str, np.ndarray], thresholds: list | None = None,
                 timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    doc: dict[str, Any] = {"inputs": {k: v.tolist() for k, v in inputs.items()}}
    if thresholds is not None:
        doc["thresholds"] = thresholds
    status, body, _ = post(url, json.dumps(doc).encode(), "application/json", timeout)
    return status, json.loads(body)


def predict_npz(url: str, inputs: dict[str, np.ndarray], timeout: float = 60.0) -> tuple[int, Any]:
    buf = io.BytesIO()
    np.savez(buf, **inputs)
    status, body, ctype = post(url, buf.getvalue(), "application/octet-stream", timeout)
    if ctype.startswith("application/octet-stream"):
        with np.load(io.BytesIO(body)) as npz:
            return status, {k: npz[k] for k in npz.files}
    return status, json.loads(body)


def stream_events(url: str, doc: dict[str, Any], timeout: float = 60.0) -> Any:
    """POST ``doc`` as JSON and yield each server-sent event's ``data`` (parsed JSON) as it arrives; an HTTP
    error is yielded once as ``{"status": code, **body}``."""
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            assert r.headers.get("content-type", "").startswith("text/event-stream"), r.headers
            for line in r:
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
    except urllib.error.HTTPError as e:
        yield {"status": e.code, **json.loads(e.read())}


def descendants(pid: int) -> list[int]:
    """Live processes below ``pid`` (from /proc; zombies excluded)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parent[int(d.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def own_descendants() -> list[int]:
    return descendants(os.getpid())


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    out = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(p)
    return out
