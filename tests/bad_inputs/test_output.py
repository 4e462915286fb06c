"""Bad output paths: exit 1, one line naming the path and the fix, nothing written or replaced."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from eecompile.errors import BundleError, DataError
from tests.bad_inputs.util import expect_error


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write to (chmod for normal users, a read-only tmpfs for root)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        yield d
        d.chmod(0o755)
        return
    d.chmod(0o755)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make a read-only directory as root here ({r.stderr.decode().strip()})")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


@pytest.mark.parametrize("plot", ["nodir/pareto.png", "."])
def test_calibrate_plot_path_is_checked_before_calibrating(ws: Path, plot: str) -> None:
    """The plot used to be written after calibration, creating any missing directories (even at /)."""
    expect_error(["calibrate", ws / "b.eebundle", "--data", ws / "data.npz", "--max-drop", "0.2",
                  "--plot", ws / plot], DataError, "--plot", str(ws / plot), "--plot path" if "/" in plot else
                 "is a directory", workspace=ws)
    assert not (ws / "nodir").exists()


def test_output_is_a_file_with_force(ws: Path) -> None:
    (ws / "out").write_text("keep me")
    expect_error(["compile", ws / "spec.yaml", "-o", ws / "out", "--force"], BundleError, "out", "is a file",
                 "choose another -o path", workspace=ws)


def test_output_is_a_file_without_force(ws: Path) -> None:
    (ws / "out").write_text("keep me")
    expect_error(["compile", ws / "spec.yaml", "-o", ws / "out"], BundleError, "out", "is a file",
                 "choose another -o path", workspace=ws)


def test_output_exists_without_force(ws: Path) -> None:
    expect_error(["compile", ws / "spec.yaml", "-o", ws / "b.eebundle"], BundleError, "b.eebundle",
                 "already exists", "--force", workspace=ws)


def test_output_is_a_directory_that_is_not_a_bundle(ws: Path) -> None:
    (ws / "photos").mkdir()
    (ws / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    expect_error(["compile", ws / "spec.yaml", "-o", ws / "photos", "--force"], BundleError, "photos",
                 "not an eecompile bundle", "choose another -o path", workspace=ws)


def test_output_parent_does_not_exist(ws: Path) -> None:
    expect_error(["compile", ws / "spec.yaml", "-o", ws / "no" / "such" / "b.eebundle"], BundleError,
                 "does not exist", "create it", workspace=ws)


def test_output_directory_not_writable(ws: Path, read_only_dir: Path) -> None:
    expect_error(["compile", ws / "spec.yaml", "-o", read_only_dir / "b.eebundle"], BundleError,
                 str(read_only_dir), "not writable", "choose another -o path", workspace=ws)
    assert list(read_only_dir.iterdir()) == []


def test_run_output_directory_missing(ws: Path) -> None:
    expect_error(["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "none" / "out.npz"], DataError,
                 "does not exist", "choose another -o path", workspace=ws)


def test_run_output_directory_not_writable(ws: Path, read_only_dir: Path) -> None:
    expect_error(["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", read_only_dir / "out.npz"],
                 DataError, "out.npz", "writable", workspace=ws)


@pytest.mark.parametrize("same", ["data.npz", "./data.npz", "link.npz"])
def test_run_output_is_the_input_file(ws: Path, same: str) -> None:
    """`run --data in.npz -o in.npz` used to replace the user's inputs with the outputs."""
    if same == "link.npz":
        os.link(ws / "data.npz", ws / "link.npz")
    expect_error(["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / same], DataError,
                 str(ws / same), "is the --data file", "choose another -o path", workspace=ws)


@pytest.mark.parametrize("where", ["b.eebundle", "b.eebundle/repo", "."])
def test_export_triton_into_or_over_the_bundle(ws: Path, where: str) -> None:
    """`-o BUNDLE --force` used to replace the bundle with the repository, `-o BUNDLE/repo` recursed without
    end, and `-o DIR-HOLDING-THE-BUNDLE --force` would have deleted that directory."""
    expect_error(["export", "triton", ws / "b.eebundle", "-o", ws / where, "--force"], DataError,
                 "the bundle", "must not overlap it", "choose an -o path outside the bundle", workspace=ws)


@pytest.mark.parametrize("plot", ["pareto.xyz", "data.npz"])
def test_calibrate_plot_that_cannot_be_written_is_refused_first(ws: Path, plot: str) -> None:
    """An unknown image suffix used to fail after the thresholds were written (an internal error), and
    `--plot DATA.npz` would have replaced the calibration data with a picture."""
    expect_error(["calibrate", ws / "b.eebundle", "--data", ws / "data.npz", "--max-drop", "0.2",
                  "--plot", ws / plot], DataError, "--plot", str(ws / plot), workspace=ws)
