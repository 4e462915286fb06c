"""Pure parts of the TensorRT path (no GPU, no TensorRT): versions, targets, records, profiles, row runs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from handmade import make_manifest, write_bundle

from eecompile.build import compute_profiles
from eecompile.bundle import Bundle, GateInfo, update_bundle
from eecompile.errors import BackendError, BundleError, DataError
from eecompile.runtimes.base import resolve_thresholds
from eecompile.runtimes.records import (
    EngineRecord,
    check_engine_record,
    engine_file,
    engine_records,
    engine_target,
    parse_trt_version,
    rebuild_command,
)
from eecompile.runtimes.tensorrt import batch_layout, paired_runs


# --- versions and targets ----------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "path", "by_flag"), [("10.13.0.35", "v10", True), ("10.3.0", "v10", True),
                                                          ("11.4.1", "v11", False)])
def test_version_dispatch(version: str, path: str, by_flag: bool) -> None:
    v = parse_trt_version(version)
    assert v.path == path and v.fp16_by_flag is by_flag and v.full == version


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "12.0.0"])
def test_unsupported_version_is_refused_clearly(version: str) -> None:
    with pytest.raises(BackendError, match=r"not supported.*10\.x.*11\.x"):
        parse_trt_version(version)


def test_unreadable_version() -> None:
    with pytest.raises(BackendError, match="cannot read the TensorRT version"):
        parse_trt_version("dev")


def test_target_and_file_name() -> None:
    assert engine_target("9.0", "10.13.0.35") == "sm90-trt10.13"
    assert engine_target("8.7", "11.4.1") == "sm87-trt11.4"
    assert engine_file(2, "sm90-trt10.13") == "engines/seg2.tensorrt.sm90-trt10.13.plan"


# --- records -------------------------------------------------------------------------------------------
def _record(**kw: object) -> EngineRecord:
    base = dict(segment=0, backend="tensorrt", target="sm90-trt10.13", file="engines/seg0.tensorrt.sm90-trt10.13.plan",
                sha256="ab" * 32, backend_version="10.13.0.35", gpu_name="NVIDIA H200", compute_capability="9.0",
                flags={"fp16": True, "max_batch": 16, "opt_batch": 8, "workspace_mb": 512})
    base.update(kw)
    return EngineRecord(**base)  # type: ignore[arg-type]


def test_record_round_trip() -> None:
    r = _record(profiles={"x": [[1, 3], [8, 3], [16, 3]]})
    assert EngineRecord.from_dict(r.to_dict()) == r


def test_malformed_record() -> None:
    with pytest.raises(BundleError, match="malformed engine record"):
        EngineRecord.from_dict({"segment": 0})


def test_matching_record_passes() -> None:
    check_engine_record(_record(), "10.13.0.35", "NVIDIA H200", "9.0")


def test_other_trt_version_names_rebuild_command() -> None:
    with pytest.raises(BackendError) as e:
        check_engine_record(_record(), "10.14.1.48", "NVIDIA H200", "9.0", bundle_path="m.eebundle")
    msg = str(e.value)
    assert "built with TensorRT 10.13.0.35" in msg and "10.14.1.48" in msg
    assert "`eecompile build m.eebundle --backend tensorrt --fp16 --max-batch 16 --opt-batch 8 --workspace 512`" in msg
    assert "m.eebundle/engines/seg0.tensorrt.sm90-trt10.13.plan" in msg


def test_other_gpu_is_refused() -> None:
    with pytest.raises(BackendError, match=r"compute capability 9\.0.*this GPU is 8\.7.*eecompile build"):
        check_engine_record(_record(), "10.13.0.35", "Orin", "8.7")


def test_same_cc_other_model(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(BackendError, match="built on NVIDIA H200, this GPU is NVIDIA H100"):
        check_engine_record(_record(), "10.13.0.35", "NVIDIA H100", "9.0")
    with caplog.at_level(logging.WARNING):
        check_engine_record(_record(), "10.13.0.35", "NVIDIA H100", "9.0", strict_gpu=False)
    assert "same compute capability" in caplog.text


def test_rebuild_command_plain() -> None:
    assert rebuild_command("b") == "eecompile build b --backend tensorrt"


def test_records_saved_in_manifest_and_tampered_engine_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.eebundle"
    write_bundle(path)
    rec = _record(sha256=None)

    def change(tmp: Path, manifest: object) -> None:
        (tmp / "engines").mkdir()
        (tmp / rec.file).write_bytes(b"plan bytes")  # type: ignore[operator]
        manifest.engines.append(rec.to_dict())  # type: ignore[attr-defined]

    b = update_bundle(path, change)
    got = engine_records(b.manifest, "tensorrt", "sm90-trt10.13")
    assert [r.segment for r in got] == [0] and got[0].flags["fp16"] is True
    assert engine_records(b.manifest, "tensorrt", "sm87-trt10.3") == []
    (path / rec.file).write_bytes(b"evil bytes")  # type: ignore[operator]
    with pytest.raises(BundleError, match="sha256 does not match"):
        Bundle.load(path)


# --- profiles --------------------------------------------------------------------------------------------
def test_profiles_batch_range_and_fixed_dims() -> None:
    p = compute_profiles(make_manifest(), max_batch=16, opt_batch=4)
    assert p[0]["x"] == ((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))
    assert p[1]["act"] == ((1, 4, 8, 8), (4, 4, 8, 8), (16, 4, 8, 8))
    assert "ee0.threshold" not in p[0]  # a static scalar needs no profile


def test_opt_defaults_to_max() -> None:
    assert compute_profiles(make_manifest(), max_batch=8)[0]["x"][1][0] == 8


@pytest.mark.parametrize(("max_b", "opt_b"), [(0, None), (8, 9), (8, 0)])
def test_bad_batch_options(max_b: int, opt_b: int | None) -> None:
    with pytest.raises(BackendError, match="batch"):
        compute_profiles(make_manifest(), max_batch=max_b, opt_batch=opt_b)


def test_symbolic_dim_needs_a_size() -> None:
    with pytest.raises(BackendError, match=r"segment 0 input 'x' axis 2 is a symbolic dim \('H'\).*sample inputs"):
        compute_profiles(make_manifest(sym_hw=True), max_batch=4)


def test_symbolic_dim_from_data_carries_to_other_tensors() -> None:
    p = compute_profiles(make_manifest(sym_hw=True), max_batch=4, data_shapes={"x": (100, 3, 16, 16)})
    assert p[0]["x"] == ((1, 3, 16, 16), (4, 3, 16, 16), (4, 3, 16, 16))
    assert p[1]["act"][2] == (4, 4, 16, 16)  # 'H' learnt from x applies to the carried tensor


def test_symbolic_dim_range_given() -> None:
    p = compute_profiles(make_manifest(sym_hw=True), max_batch=4, dim_sizes={"H": (8, 16, 32)})
    assert p[0]["x"] == ((1, 3, 8, 8), (4, 3, 16, 16), (4, 3, 32, 32))


def test_data_rank_mismatch() -> None:
    with pytest.raises(DataError, match="'x' has shape"):
        compute_profiles(make_manifest(sym_hw=True), max_batch=4, data_shapes={"x": (3, 16, 16)})


def test_per_sample_bundle_gets_batch_one() -> None:
    m = make_manifest()
    m.batch_mode = "per_sample"
    assert compute_profiles(m, max_batch=32)[0]["x"] == ((1, 3, 8, 8),) * 3


def test_batch_axis_not_zero() -> None:
    m = make_manifest()
    m.segments[1].inputs[0].batch_axis = 1
    m.segments[1].inputs[0].shape = [4, "N", 8, 8]
    assert compute_profiles(m, max_batch=6, opt_batch=2)[1]["act"] == ((4, 1, 8, 8), (4, 2, 8, 8), (4, 6, 8, 8))


# --- row runs (the copies a gather/scatter issues) ------------------------------------------------------
def test_paired_runs_merge_consecutive_rows() -> None:
    assert paired_runs(np.array([0, 1, 2, 5, 6, 9]), np.arange(6)) == [(0, 0, 3), (5, 3, 2), (9, 5, 1)]
    assert paired_runs(np.array([], np.int64), np.array([], np.int64)) == []
    # scatter: consecutive current rows going to non-consecutive result rows split too
    assert paired_runs(np.array([0, 1, 2]), np.array([3, 4, 7])) == [(0, 3, 2), (2, 7, 1)]


def test_batch_layout() -> None:
    assert batch_layout((8, 4, 2, 2), 0, 4) == (1, 64)
    assert batch_layout((4, 8, 2, 2), 1, 4) == (4, 16)
    assert batch_layout((8,), 0, 1) == (1, 1)


def test_resolve_thresholds() -> None:
    def gates(*ts: float) -> list[GateInfo]:
        return [GateInfo("max_prob", t, f"ee{k}.gate", f"ee{k}.threshold") for k, t in enumerate(ts)]

    assert resolve_thresholds(gates(0.9, 0.5), None).as_list() == [0.9, 0.5]
    assert resolve_thresholds(gates(0.9, 0.5), "never").as_list() == ["never", "never"]
    assert resolve_thresholds(gates(0.9, 0.5), ["always", "0.3"]).as_list() == ["always", 0.3]
    with pytest.raises(DataError, match="2 early exits"):
        resolve_thresholds(gates(0.9, 0.5), [0.1])
    with pytest.raises(DataError, match="sometimes"):
        resolve_thresholds(gates(0.9), ["sometimes"])
