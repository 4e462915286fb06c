"""Engine records: what ``manifest.engines`` says about each backend engine, and the checks a runtime makes.

A record ties an engine file to the machine that can run it (backend version, GPU, target), so a runtime can
refuse a wrong-machine engine before deserializing it and name the command that rebuilds it. ``eecompile build``
(:mod:`eecompile.build`) writes the records; the runtimes read them. This module is part of the runtime: it
imports only the standard library, the bundle reader and the errors, so a device without onnx or
the compiler can check its engines.

File names: ``engines/seg{k}.tensorrt.{target}.plan`` (TensorRT; ``target`` such as ``sm90-trt10.13``: GPU
architecture and TensorRT major.minor) and ``engines/seg{k}.onnxruntime.{target}.onnx`` (ONNX Runtime CPU
engines; ``target`` such as ``ort1.32-nchwc16``: ORT major.minor and the NCHWc block size).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eecompile.bundle import Manifest
from eecompile.errors import BackendError, BundleError

log = logging.getLogger(__name__)

SUPPORTED_TRT_MAJORS = (10, 11)
INSTALL_HINT = ("pip install 'eecompile[gpu]' (on a Jetson: use JetPack's TensorRT, "
                "`sudo apt install python3-libnvinfer`, in a venv made with --system-site-packages)")


# ------------------------------------------------------------------------------------ versions, targets

@dataclass(frozen=True)
class TRTVersion:
    """A TensorRT version and the API path it takes (``"v10"``: builder flags, ``"v11"``: strongly typed)."""

    full: str
    major: int
    minor: int

    @property
    def path(self) -> str:
        """The API generation: ``"v10"`` or ``"v11"``."""
        return f"v{self.major}"

    @property
    def short(self) -> str:
        """``MAJOR.MINOR``, as engine targets name it (``10.13``)."""
        return f"{self.major}.{self.minor}"

    @property
    def fp16_by_flag(self) -> bool:
        """TensorRT 10 takes ``BuilderFlag.FP16``; 11 removed it (precision comes from the ONNX dtypes)."""
        return self.major == 10


def parse_trt_version(version: str) -> TRTVersion:
    """Parse ``tensorrt.__version__``; refuse versions this eecompile was not written for."""
    m = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    if not m:
        raise BackendError(f"cannot read the TensorRT version from {version!r}; reinstall TensorRT ({INSTALL_HINT})")
    major, minor = int(m.group(1)), int(m.group(2))
    if major not in SUPPORTED_TRT_MAJORS:
        raise BackendError(
            f"TensorRT {version} is not supported: eecompile builds with TensorRT 10.x (JetPack 6) or 11.x "
            f"(JetPack >= 7.2.2); install one of them ({INSTALL_HINT})"
        )
    return TRTVersion(full=str(version).strip(), major=major, minor=minor)


def engine_target(compute_capability: str, trt_version: str) -> str:
    """The target an engine is tied to, e.g. ``sm90-trt10.13`` for compute capability 9.0 and TensorRT 10.13.x."""
    v = parse_trt_version(trt_version)
    m = re.match(r"^\s*(\d+)\.(\d+)\s*$", compute_capability)
    if not m:
        raise BackendError(f"compute capability {compute_capability!r} is not MAJOR.MINOR")
    return f"sm{m.group(1)}{m.group(2)}-trt{v.short}"


def engine_file(segment: int, target: str, backend: str = "tensorrt") -> str:
    """Bundle-relative path of segment ``segment``'s engine: ``engines/seg{k}.{backend}.{target}.plan``."""
    return f"engines/seg{segment}.{backend}.{target}.plan"


def ort_engine_file(segment: int, target: str) -> str:
    """Bundle-relative path of segment ``segment``'s ORT CPU engine: ``engines/seg{k}.onnxruntime.{target}.onnx``."""
    return f"engines/seg{segment}.onnxruntime.{target}.onnx"


def ort_no_exit_file(target: str) -> str:
    """Bundle-relative path of the ORT CPU no-exit engine (the chain without heads and gates, one graph):
    ``engines/noexit.onnxruntime.{target}.onnx``; the final segment's record names it (``flags.no_exit``)."""
    return f"engines/noexit.onnxruntime.{target}.onnx"



# ------------------------------------------------------------------------------------------- records

@dataclass
class EngineRecord:
    """What ``manifest.engines`` holds for one engine: enough to refuse it on the wrong machine."""

    segment: int
    backend: str
    target: str
    file: str | None  # bundle-relative; None when the backend stores nothing (onnxruntime)
    sha256: str | None
    backend_version: str  # TensorRT (or ONNX Runtime) version that built it
    gpu_name: str | None = None
    compute_capability: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)  # fp16, max_batch, opt_batch, workspace_mb, precision
    profiles: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max]
    built_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The record as ``manifest.engines`` stores it (plain YAML types)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineRecord:
        """Read one ``manifest.engines`` entry; raises :class:`BundleError` (naming the record) when malformed."""
        try:
            return cls(segment=int(d["segment"]), backend=str(d["backend"]), target=str(d["target"]),
                       file=d.get("file"), sha256=d.get("sha256"), backend_version=str(d["backend_version"]),
                       gpu_name=d.get("gpu_name"), compute_capability=d.get("compute_capability"),
                       flags=dict(d.get("flags") or {}), profiles=dict(d.get("profiles") or {}),
                       built_at=str(d.get("built_at", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest.engines: malformed engine record {dict(d)!r} ({e}); "
                              f"rebuild the engines with `eecompile build`") from e


def engine_records(manifest: Manifest, backend: str, target: str | None = None) -> list[EngineRecord]:
    """The records of ``backend`` (and ``target``) in the manifest, by segment."""
    out = [EngineRecord.from_dict(d) for d in manifest.engines if d.get("backend") == backend]
    if target is not None:
        out = [r for r in out if r.target == target]
    return sorted(out, key=lambda r: r.segment)


def rebuild_command(bundle_path: str | Path, flags: Mapping[str, Any] | None = None,
                    backend: str = "tensorrt") -> str:
    """The ``eecompile build`` line that reproduces an engine with the same flags on this machine."""
    flags = flags or {}
    parts = ["eecompile", "build", str(bundle_path), "--backend", backend]
    if flags.get("fp16"):
        parts.append("--fp16")
    for key, opt in (("max_batch", "--max-batch"), ("opt_batch", "--opt-batch"), ("workspace_mb", "--workspace")):
        if flags.get(key) is not None:
            parts += [opt, str(flags[key])]
    return " ".join(parts)


def check_engine_record(record: EngineRecord, trt_version: str, gpu_name: str, compute_capability: str,
                        bundle_path: str | Path = "BUNDLE", strict_gpu: bool = True) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU, naming the rebuild command.

    TensorRT refuses such a plan itself ("Version tag does not match") but only after reading it, and with a
    message that names neither the file nor the fix. A different GPU model with the same compute capability
    deserializes but may be slow or wrong-tuned: refused unless ``strict_gpu=False`` (then a warning).
    """
    where = f"{bundle_path}/{record.file}" if record.file else f"{bundle_path} segment {record.segment}"
    fix = f"rebuild the engines on this machine: `{rebuild_command(bundle_path, record.flags)}`"
    if record.backend != "tensorrt":
        raise BackendError(f"{where}: a {record.backend} record, not a TensorRT engine")
    if record.backend_version.strip() != str(trt_version).strip():
        raise BackendError(f"{where}: built with TensorRT {record.backend_version}, this machine has TensorRT "
                           f"{trt_version} (engines only load on the version that built them); {fix}")
    if (record.compute_capability or "") != compute_capability:
        raise BackendError(f"{where}: built for compute capability {record.compute_capability} "
                           f"({record.gpu_name}), this GPU is {compute_capability} ({gpu_name}); {fix}")
    if (record.gpu_name or "") != gpu_name:
        msg = f"{where}: built on {record.gpu_name}, this GPU is {gpu_name} (same compute capability)"
        if strict_gpu:
            raise BackendError(f"{msg}; {fix}")
        log.warning("%s; it may run slower than an engine built here", msg)


def replace_engine_records(tmp: Path, manifest: Manifest, records: Sequence[EngineRecord], backend: str,
                           target: str, drop_fileless: bool = False) -> None:
    """Swap in ``records`` for ``backend``/``target`` in a staged bundle: engines for other targets stay (one
    bundle can carry engines for several GPUs or CPUs), this target's old records and files go."""
    new_files = {r.file for r in records} | {(r.flags.get("no_exit") or {}).get("file") for r in records}
    stale = [d for d in manifest.engines if d.get("backend") == backend
             and (d.get("target") == target or (drop_fileless and not d.get("file")))]
    for d in stale:
        for f in (d.get("file"), ((d.get("flags") or {}).get("no_exit") or {}).get("file")):
            if f and (tmp / f).is_file() and f not in new_files:
                (tmp / f).unlink()
    manifest.engines = [d for d in manifest.engines if d not in stale] + [r.to_dict() for r in records]
