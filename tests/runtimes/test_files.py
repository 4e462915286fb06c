"""`eecompile run` (eecompile.runtimes.files.run_npz) on the handmade three-segment bundle: --thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eecompile.runtimes.files import parse_threshold_list, run_npz
from tests.runtimes.handmade import make_bundle


def test_one_threshold_value_sets_every_exit(tmp_path: Path) -> None:
    """`run --thresholds never` on a bundle with two early exits was refused with "got 1 values for 2 early exits;
    give one per exit (or one number or 'never'/'always' for all)", the very thing given."""
    hm = make_bundle(tmp_path / "b.eebundle")
    np.savez(tmp_path / "in.npz", **hm.inputs(8))
    out = tmp_path / "out.npz"
    run_npz(hm.path, tmp_path / "in.npz", out, thresholds="never")
    assert np.load(out)["exit_index"].tolist() == [2] * 8
    run_npz(hm.path, tmp_path / "in.npz", out, thresholds="always")
    assert np.load(out)["exit_index"].tolist() == [0] * 8
    assert parse_threshold_list("0.9, never") == ["0.9", "never"] and parse_threshold_list("0.9,") == ["0.9"]
    from eecompile.errors import ThresholdError

    with pytest.raises(ThresholdError, match=r"--thresholds: got 1 values for 2 early exits"):
        run_npz(hm.path, tmp_path / "in.npz", out, thresholds="0.9,")  # a list of one is a list
