"""CLI edges: a reader that goes away (``| head -1``) never fails a command that finished its work, and
output files get the mode the umask gives (not 0600)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np

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
def test_run_output_follows_the_umask(ws: Path) -> None:
    old = os.umask(0o022)
    try:
        res = invoke(["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "out.npz"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE((ws / "out.npz").stat().st_mode) == 0o644
    with np.load(ws / "out.npz") as z:
        assert z["logits"].shape == (16, 4) and z["exit_index"].shape == (16,)


def test_run_streams_and_keeps_the_cli_contract(ws: Path) -> None:
    """Batches smaller than the data, policy never (per-exit outputs, gate masks along axis 1), a raised
    --max-input-bytes: the same rows as one in-memory run."""
    import eecompile

    x = np.random.default_rng(3).standard_normal((37, 8))  # float64: cast batch by batch
    np.savez_compressed(ws / "d.npz", x=x)
    res = invoke(["run", ws / "b.eebundle", "--data", ws / "d.npz", "-o", ws / "o.npz", "--batch", "5",
                  "--policy", "never", "--max-input-bytes", "100000"])
    assert res.exit_code == 0, res.output
    assert "37 samples" in res.output
    want = eecompile.load(ws / "b.eebundle").run({"x": x.astype(np.float32)}, policy="never")
    with np.load(ws / "o.npz") as z:
        np.testing.assert_allclose(z["logits"], want.outputs["logits"], rtol=1e-6)
        np.testing.assert_array_equal(z["exit_index"], want.exit_index)
        np.testing.assert_array_equal(z["gate_masks"], want.gate_masks)
        assert z["gate_masks"].shape == (2, 37)
        np.testing.assert_allclose(z["exit0.logits"], want.all_exits[0]["logits"], rtol=1e-6)
    assert sorted(p.name for p in ws.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    # A layout that cannot be streamed (Fortran order, compressed) is read whole: the cap applies.
    np.savez_compressed(ws / "f.npz", x=np.asfortranarray(x))
    res = invoke(["run", ws / "b.eebundle", "--data", ws / "f.npz", "-o", ws / "o2.npz", "--max-input-bytes", "100"])
    assert res.exit_code == 1 and "--max-input-bytes" in res.stderr and not (ws / "o2.npz").exists()
    res = invoke(["run", ws / "b.eebundle", "--data", ws / "f.npz", "-o", ws / "o2.npz"])
    assert res.exit_code == 0, res.output
    with np.load(ws / "o2.npz") as z:
        np.testing.assert_array_equal(z["exit_index"], want.exit_index)
