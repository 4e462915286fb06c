"""Bundle read/write: a directory with ``manifest.yaml``, ``segments/seg{i}.onnx`` and engine files.

Writes are atomic: everything goes to a temporary directory beside the destination, which then replaces
the destination in one step (``renameat2(RENAME_EXCHANGE)`` on Linux, two renames elsewhere). A failed or
killed write leaves any earlier bundle untouched. Every file's sha256 is in the manifest and checked on load.

This module must import with numpy + pyyaml alone (the embedded runtime reads bundles on a Jetson).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eecompile.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.yaml"


@dataclass
class TensorInfo:
    """A tensor crossing a segment boundary (or a model input/output): its ``name``, numpy ``dtype`` name
    (``"float32"``, ``"int64"``, ``"bool"``...) and ``shape`` (ints for fixed axes, the symbol's name as a str
    for symbolic ones such as ``"batch"`` or a sequence length, None where unknown). ``batch_axis`` is the axis
    along which samples are stacked (measured by the compiler's probe), or None for a tensor whose value does
    not depend on the batch."""

    name: str
    dtype: str
    shape: list[int | str | None]
    batch_axis: int | None = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorInfo:
        """From the manifest's mapping (KeyError for a missing field)."""
        return cls(name=d["name"], dtype=d["dtype"], shape=list(d["shape"]), batch_axis=d.get("batch_axis"))


@dataclass
class GateInfo:
    """An exit's in-graph gate: its ``kind`` (a :class:`~eecompile.spec.GateKind` value), the ``threshold`` in
    use (set by the spec, then by calibration), and the names of its tensors in the segment graph: ``output``
    (bool [B], True where the sample exits), ``threshold_input`` (float32 scalar, fed at run time),
    ``score_output`` (float32 [B], the value compared with the threshold), and the state it reads from the
    previous exit and hands to the next (patience: argmax and count; saturation: the pooled hidden state).
    Names follow :mod:`eecompile.names`."""

    kind: str
    threshold: float
    output: str  # bool [B] output of the segment graph: True = this sample exits here
    threshold_input: str  # scalar float32 input of the segment graph
    score_output: str | None = None  # float [B] gate value (the thing compared with the threshold)
    state_inputs: list[str] = field(default_factory=list)  # e.g. patience: previous argmax and count
    state_outputs: list[str] = field(default_factory=list)


@dataclass
class ExitInfo:
    """Exit ``index`` (the last one is the model's own final output): the tensors it cuts at (``at``), how its
    head was made (``head``), which segment tensor stands in for each final output (``outputs``), its gate
    (None for the final exit, which always exits), an optional display ``name``, and for heads eecompile
    trains, ``head_spec`` (kind, options, feature shape, class count, whether trained)."""

    index: int
    at: list[str]
    head: str  # how the head was made: file:NAME, model-output:NAME, trained:KIND
    outputs: dict[str, str]  # final output name -> tensor name of this exit's output in the segment
    gate: GateInfo | None = None  # None for the final exit (it always exits)
    name: str | None = None
    head_spec: dict[str, Any] | None = None  # trained heads: kind and options, for train-heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExitInfo:
        """From the manifest's mapping (KeyError/TypeError for a missing or malformed field)."""
        gate = GateInfo(**d["gate"]) if d.get("gate") else None
        return cls(index=d["index"], at=list(d["at"]), head=d["head"], outputs=dict(d["outputs"]),
                   gate=gate, name=d.get("name"), head_spec=d.get("head_spec"))


@dataclass
class SegmentInfo:
    """Segment ``index``: its ONNX ``file`` (relative to the bundle), its data inputs and graph outputs, its
    exit, the outputs later segments read (``carried_out``), and its cost: ``flops`` per sample (a
    multiply-add counts 2; only Conv/MatMul/Gemm/Einsum/attention/recurrent ops are counted) and
    ``flops_fraction`` of the whole model's."""

    index: int
    file: str  # relative to the bundle
    inputs: list[TensorInfo]  # data inputs: model inputs, carried tensors, gate state (not the threshold)
    outputs: list[TensorInfo]  # every graph output: carried tensors, exit outputs, gate, state
    exit: ExitInfo
    carried_out: list[str] = field(default_factory=list)  # outputs later segments read
    flops: int = 0
    flops_fraction: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentInfo:
        """From the manifest's mapping (KeyError/TypeError for a missing or malformed field)."""
        return cls(index=d["index"], file=d["file"],
                   inputs=[TensorInfo.from_dict(t) for t in d["inputs"]],
                   outputs=[TensorInfo.from_dict(t) for t in d["outputs"]],
                   exit=ExitInfo.from_dict(d["exit"]), carried_out=list(d.get("carried_out", [])),
                   flops=int(d.get("flops", 0)), flops_fraction=float(d.get("flops_fraction", 0.0)))


@dataclass
class Manifest:
    """``manifest.yaml``: everything a runtime needs to chain a bundle's segments, and its provenance.

    ``inputs`` are the model's inputs (batch axis 0; ``"batch"`` in dynamic mode) and ``outputs`` the final
    output every exit produces, one row per sample. ``segments`` are in chain order. ``batch_mode`` is
    ``"dynamic"`` or ``"per_sample"`` (the model only runs at batch 1; runtimes feed one sample at a time).
    ``class_axis`` is the final output's class axis. ``calibration``, ``engines`` and ``heads`` are written
    by ``calibrate``, ``build`` and ``train-heads``; ``files`` maps each bundle file to its sha256, checked on
    load. Raises nothing itself; :meth:`from_dict` raises BundleError for a manifest it cannot read.
    """

    source_model: dict[str, Any]  # {file, sha256}
    inputs: list[TensorInfo]  # the model's inputs (batch axis 0)
    outputs: list[TensorInfo]  # the final outputs every exit produces, one row per sample
    segments: list[SegmentInfo]
    batch_mode: str = "dynamic"  # "dynamic", or "per_sample" when the model only runs at batch 1
    class_axis: int = -1
    format_version: int = FORMAT_VERSION
    eecompile_version: str = ""
    calibration: dict[str, Any] | None = None
    engines: list[dict[str, Any]] = field(default_factory=list)
    heads: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    decoder: dict[str, Any] | None = None  # decoding bundles: segments with KV caches, the shared head, exits

    @property
    def exits(self) -> list[ExitInfo]:
        """Every exit, the final one last."""
        return [s.exit for s in self.segments]

    @property
    def n_early_exits(self) -> int:
        """How many exits can fire before the final output."""
        return len(self.segments) - 1

    @property
    def thresholds(self) -> list[float]:
        """The threshold in use at each early exit, in order."""
        return [s.exit.gate.threshold for s in self.segments if s.exit.gate is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the YAML file (the format and eecompile versions first)."""
        d = asdict(self)
        # Keep the header first in the YAML for people reading it.
        head = {k: d.pop(k) for k in ("format_version", "eecompile_version")}
        return {**head, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> Manifest:
        """Parse a loaded manifest; BundleError (naming ``where``) when it is not one, is from a newer format
        version, or is incomplete."""
        if not isinstance(d, dict) or "format_version" not in d:
            raise BundleError(f"{where}: not an eecompile manifest (no format_version)")
        version = d["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(
                f"{where}: format version {version} is newer than this eecompile reads ({FORMAT_VERSION}); "
                f"upgrade eecompile or recompile the bundle with this version"
            )
        try:
            return cls(
                source_model=dict(d["source_model"]),
                inputs=[TensorInfo.from_dict(t) for t in d["inputs"]],
                outputs=[TensorInfo.from_dict(t) for t in d["outputs"]],
                segments=[SegmentInfo.from_dict(s) for s in d["segments"]],
                batch_mode=d.get("batch_mode", "dynamic"),
                class_axis=int(d.get("class_axis", -1)),
                format_version=version,
                eecompile_version=d.get("eecompile_version", ""),
                calibration=d.get("calibration"),
                engines=list(d.get("engines") or []),
                heads=dict(d.get("heads") or {}),
                notes=list(d.get("notes") or []),
                files=dict(d.get("files") or {}),
                decoder=d.get("decoder"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: manifest is incomplete or malformed ({e!r}); recompile the bundle") from e


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Bundle:
    """A bundle on disk: its directory and its parsed manifest."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    def file(self, rel: str) -> Path:
        return self.path / rel

    def verify_file(self, rel: str) -> Path:
        """The path of a bundle file after checking it exists and matches its recorded sha256."""
        p = self.path / rel
        if rel not in self.manifest.files:
            raise BundleError(f"{self.path}: '{rel}' is not listed in the manifest; recompile the bundle")
        if not p.is_file():
            raise BundleError(f"{p}: file missing from the bundle; recompile or copy the whole bundle again")
        digest = sha256_file(p)
        if digest != self.manifest.files[rel]:
            raise BundleError(
                f"{p}: sha256 does not match the manifest (file changed or damaged); "
                f"copy the bundle again or recompile it"
            )
        return p

    def verify(self) -> None:
        for rel in self.manifest.files:
            self.verify_file(rel)

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Read a bundle's manifest and (by default) check every file's hash."""
        path = Path(path)
        if not path.exists():
            raise BundleError(f"{path}: no such bundle; create one with `eecompile compile SPEC -o {path}`")
        if not path.is_dir():
            raise BundleError(f"{path}: a bundle is a directory, this is a file")
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{mpath}: manifest missing; this is not an eecompile bundle")
        try:
            raw = yaml.safe_load(mpath.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise BundleError(f"{mpath}: manifest is not valid YAML{at} ({problem}); recompile the bundle") from e
        bundle = cls(path, Manifest.from_dict(raw, str(mpath)))
        if verify:
            bundle.verify()
        return bundle


# ------------------------------------------------------------------------------------------ atomic write

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). Returns False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_destination(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise BundleError(f"{dest}: exists and is a file, not a bundle directory; choose another -o path")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST).exists():
        raise BundleError(
            f"{dest}: exists and is not an eecompile bundle; refusing to replace it (choose another -o path)"
        )
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.exists():
        raise BundleError(f"{parent}: directory does not exist; create it or choose another -o path")
    if not os.access(parent, os.W_OK):
        raise BundleError(f"{parent}: not writable; choose another -o path")


@contextmanager
def staged_bundle(dest: str | Path, copy_from: str | Path | None = None) -> Iterator[Path]:
    """Stage a bundle in a temporary directory beside ``dest``; on clean exit it replaces ``dest``.

    With ``copy_from``, the staging directory starts as a copy of that bundle (for in-place updates such as
    train-heads, calibrate, build). On an exception the staging directory is removed and ``dest`` is unchanged.
    """
    dest = Path(dest).absolute()
    _check_destination(dest)
    _remove_stale_staging(dest)
    tmp = dest.parent / f"{_staging_prefix(dest)}{os.getpid()}-never-created"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(dest)}{os.getpid()}-", dir=dest.parent))
        # mkdtemp makes the directory private (0700); a bundle is read by whoever deploys it, like any file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if copy_from is not None:
            shutil.copytree(copy_from, tmp, dirs_exist_ok=True)
        yield tmp
        _commit(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code, text = _os_error(e)
        if code in (errno.ENOSPC, errno.EDQUOT):
            hint = f"free some space on the disk holding {dest.parent} and run it again"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "choose a writable -o path"
        else:
            hint = "check the -o path and run it again"
        raise BundleError(f"{dest}: writing the bundle failed ({text}); nothing was changed; {hint}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _os_error(e: OSError) -> tuple[int | None, str]:
    """(errno, short text) of an OSError; shutil.copytree's Error holds a list of (src, dst, message)."""
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        first = str(e.args[0][0][-1])
        m = re.match(r"\[Errno (\d+)\] ([^:]+)", first)
        return (int(m.group(1)), m.group(2)) if m else (None, first)
    return e.errno, e.strerror or str(e)


def _staging_prefix(dest: Path) -> str:
    return f".eebundle-tmp-{dest.name}-{socket.gethostname()}-"


def _remove_stale_staging(dest: Path) -> None:
    """Remove staging directories left beside ``dest`` by writers on this host that were killed (SIGKILL,
    power loss): their process is gone. A live writer's directory is never touched."""
    prefix = _staging_prefix(dest)
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return
    for p in entries:
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        pid_text = p.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _commit(tmp: Path, dest: Path) -> None:
    for root, _dirs, _files in os.walk(tmp):
        _fsync_dir(Path(root))
    if dest.exists():
        if _exchange(tmp, dest):
            _fsync_dir(dest.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old bundle
            return
        old = dest.parent / f".eebundle-old-{dest.name}-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Hash every file under ``root`` (except the manifest) into ``manifest.files`` and write it."""
    files: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(root).as_posix()] = sha256_file(p)
    manifest.files = files
    text = yaml.safe_dump(manifest.to_dict(), sort_keys=False, default_flow_style=None, width=120)
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def update_bundle(path: str | Path, change: Callable[[Path, Manifest], None]) -> Bundle:
    """Apply ``change(staging_dir, manifest)`` to a copy of the bundle and swap it in atomically."""
    bundle = Bundle.load(path)
    with staged_bundle(bundle.path, copy_from=bundle.path) as tmp:
        change(tmp, bundle.manifest)
        write_manifest(tmp, bundle.manifest)
    return Bundle.load(bundle.path)
