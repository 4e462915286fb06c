"""`eecompile report`: the page holds the bundle's facts and its figures, and renders in a real headless
Chromium (the distribution's package) with no console errors and no network."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.lm.conftest import lm_bundle, lm_dir  # noqa: F401  (the tiny Llama decoder bundle, built once)
from tests.serve.conftest import mixed_inputs

BAR = (0x4E, 0x79, 0xA7)  # the first bar colour of the report's figures


@pytest.fixture(scope="module")
def report_page(served_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from eecompile.calibrate import calibrate_bundle
    from eecompile.cli import cli

    root = tmp_path_factory.mktemp("report")
    bundle = root / "cal.eebundle"
    shutil.copytree(served_bundle, bundle)
    np.savez(root / "cal.npz", image=mixed_inputs(64, seed=11))
    calibrate_bundle(bundle, root / "cal.npz", max_drop=0.2, repeats=3, quiet=True)
    page = root / "report.html"
    result = CliRunner().invoke(cli, ["report", str(bundle), "-o", str(page), "--repeats", "3"])
    assert result.exit_code == 0, result.output
    return bundle, page


def test_report_holds_the_bundle(report_page) -> None:
    import eecompile

    bundle, page = report_page
    text = page.read_text()
    m = eecompile.Bundle.load(bundle).manifest
    for seg in m.segments:
        assert f"{seg.flops:,}" in text and f"{seg.flops_fraction:.1%}" in text
        for name in seg.carried_out:
            assert name in text
    for t in m.thresholds:  # a calibrated gate that never fires is stored as +/-inf and shown as "never"
        assert (f"{t:.4g}" if math.isfinite(t) else "never") in text
    for anchor in ("flops", "pareto", "exits", "latency"):
        assert f"id='{anchor}'" in text and "<svg" in text.split(f"id='{anchor}'")[1].split("</section>")[0]
    assert "Not calibrated" not in text and "Not measured" not in text
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", text) and "<script" not in text


def test_uncalibrated_bundle_says_so(served_bundle, tmp_path) -> None:
    from eecompile.serve.report import write_report

    text = write_report(served_bundle, tmp_path / "r.html", repeats=1).read_text()
    assert "Not calibrated: run" in text and "id='latency'" in text


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium on this machine (apt-get install -y chromium)")
    return exe


def test_report_renders_in_chromium(report_page, tmp_path) -> None:
    from PIL import Image

    _, page = report_page
    exe = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    parsed = dom.stdout
    assert parsed.count("<svg") == 4 and "<polyline" in parsed and parsed.count("class=\"bar\"") >= 6
    shot = tmp_path / "page.png"
    run = subprocess.run([exe, *flags, "--hide-scrollbars", "--window-size=1200,2600", f"--screenshot={shot}",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    bar = np.abs(pixels.astype(int) - np.array(BAR)).sum(axis=1) < 12
    assert bar.sum() > 2000  # the bars are drawn, not only present in the markup


def test_decoder_bundle_report(lm_bundle, tmp_path) -> None:  # noqa: F811
    from eecompile.bundle import Bundle
    from eecompile.serve.report import write_report

    dec = Bundle.load(lm_bundle).manifest.decoder
    text = write_report(lm_bundle, tmp_path / "lm.html").read_text()
    assert "id='decoder'" in text and f"after layer {dec['exits'][0]['after_layer']}" in text
    for seg in dec["segments"]:
        assert seg["file"] in text


def test_loop_bundle_report_times_one_step_and_labels_the_steps(tmp_path: Path) -> None:
    """`eecompile report` on a loop bundle failed with "feeds: 't' is a per-step input of the loop ... leave it
    out", about feeds the user never gave (the report made random ones for every model input). It now times one
    step's segments (per-step inputs random, the others from --data or random) and labels the calibration's rows
    by step."""
    import eecompile
    from eecompile.calibrate import calibrate_bundle
    from eecompile.cli import cli
    from tests.loops.models import export_shift, shift_loop_spec

    spec = shift_loop_spec(tmp_path, export_shift(tmp_path / "shift.onnx"))
    bundle = eecompile.compile_model(spec, tmp_path / "l.eebundle", engines=False).path
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    calibrate_bundle(bundle, tmp_path / "x.npz", max_drop=0.3, error_budget=0.5, costs=[1e-3] * 3, quiet=True)
    for extra in ([], ["--data", str(tmp_path / "x.npz")]):
        page = tmp_path / "r.html"
        result = CliRunner().invoke(cli, ["report", str(bundle), "-o", str(page), "--repeats", "2", *extra])
        assert result.exit_code == 0, result.output
        html = page.read_text()
        assert "Measured latency per segment" in html and "Not measured" not in html
        assert "After which step samples stop" in html and ">step 1<" in html, html[-3000:]
