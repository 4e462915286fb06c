"""CLI edges: a reader that goes away (``| head -1``) never fails a command that finished its work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from eecompile.errors import BundleError
from tests.bad_inputs.util import invoke


def _eecompile(args: list[str], cwd: Path, close_stdout: bool) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess whose stdout pipe is closed by the reader before anything is written."""
    p = subprocess.Popen([sys.executable, "-m", "eecompile.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    if close_stdout:
        assert p.stdout is not None
        p.stdout.close()  # like `| head -0`: every write to stdout gets EPIPE
    _, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, b"", err)


def test_broken_stdout_pipe_after_the_work_is_done(ws: Path) -> None:
    out = ws / "again.eebundle"
    r = _eecompile(["compile", str(ws / "spec.yaml"), "-o", str(out)], ws, close_stdout=True)
    assert r.returncode == 0, r.stderr.decode()
    assert b"error" not in r.stderr.lower() and b"Traceback" not in r.stderr, r.stderr.decode()
    assert (out / "manifest.yaml").is_file()  # the work was done
    r = _eecompile(["inspect", str(out)], ws, close_stdout=True)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode()


def test_broken_stdout_pipe_does_not_hide_a_failure(ws: Path) -> None:
    r = _eecompile(["inspect", str(ws / "nope.eebundle")], ws, close_stdout=True)
    assert r.returncode == 1 and b"no such bundle" in r.stderr, r.stderr.decode()
    assert isinstance(invoke(["--verbose", "inspect", ws / "nope.eebundle"]).exception, BundleError)
