"""Helpers shared by the reliability tests (bad inputs, faults, concurrency, fuzzing, large models).

A tiny workspace (an MLP model, two head files, a spec, data) compiles in about a second, so each test can
work on its own copy and check, byte for byte, that a failing command wrote or changed nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import yaml
from click.testing import CliRunner, Result
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

D, CLASSES = 8, 4


def tiny_mlp(path: Path, *, d: int = D, layers: int = 3, classes: int = CLASSES, seed: int = 0,
             external: bool = False) -> Path:
    """x[N,d] -> (MatMul, Add, Relu) x layers, naming each layer output h{i} -> logits[N,classes]."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        inits += [nh.from_array((rng.standard_normal((d, d)) * 0.5).astype(np.float32), f"W{i}"),
                  nh.from_array((rng.standard_normal(d) * 0.1).astype(np.float32), f"b{i}")]
        nodes += [oh.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  oh.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                  oh.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}")]
        cur = f"h{i}"
    inits.append(nh.from_array(rng.standard_normal((d, classes)).astype(np.float32), "Wo"))
    nodes.append(oh.make_node("MatMul", [cur, "Wo"], ["logits"], name="out"))
    g = oh.make_graph(nodes, "tiny_mlp", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                      [oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    if external:
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(m, path)
    return path


def linear_head(path: Path, width: int = D, classes: int = CLASSES, seed: int = 0) -> Path:
    """A head file: y = x @ W + b, with input [N, width] and output [N, classes]."""
    rng = np.random.default_rng(seed)
    g = oh.make_graph(
        [oh.make_node("Gemm", ["x", "W", "B"], ["y"])], "head",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        [nh.from_array(rng.standard_normal((width, classes)).astype(np.float32), "W"),
         nh.from_array(np.zeros(classes, np.float32), "B")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def spec_doc(model: str = "model.onnx", thresholds: Sequence[float] = (0.5, 0.5)) -> dict:
    return {"model": model, "exits": [
        {"at": "h0", "head": "head0.onnx", "gate": {"kind": "max_prob", "threshold": thresholds[0]}},
        {"at": "h1", "head": "head1.onnx", "gate": {"kind": "max_prob", "threshold": thresholds[1]}},
    ]}


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def make_workspace(root: Path, *, compile_bundle: bool = True) -> Path:
    """root/{model.onnx, head0.onnx, head1.onnx, spec.yaml, data.npz[, b.eebundle]}."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_mlp(root / "model.onnx")
    linear_head(root / "head0.onnx", seed=1)
    linear_head(root / "head1.onnx", seed=2)
    write_yaml(root / "spec.yaml", spec_doc())
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.standard_normal((16, D)).astype(np.float32),
             labels=rng.integers(0, CLASSES, 16))
    if compile_bundle:
        from eecompile.compiler import compile_model

        compile_model(root / "spec.yaml", root / "b.eebundle")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones included) -> sha256 of a file, or 'dir'."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
                continue
            with open(p, "rb") as fh:
                out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def copy_workspace(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    return dest


@dataclass
class CliError:
    result: Result
    message: str  # the one stderr line, without the "error: " prefix


def invoke(args: Sequence[str]) -> Result:
    from eecompile.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def expect_error(args: Sequence[str | Path], error_type: type[BaseException], *needles: str,
                 workspace: Path | None = None) -> CliError:
    """Run the CLI: exit 1, exactly one line on stderr naming each of ``needles`` (case-insensitive), no
    traceback; with --verbose the exception raised is ``error_type``; ``workspace`` is unchanged."""
    before = snapshot(workspace) if workspace is not None else None
    res = invoke(args)
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {res.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in res.output
    msg = lines[0][len("error: "):]
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in the message {msg!r}"
    if workspace is not None:
        assert snapshot(workspace) == before, "a failing command wrote or changed files"
    verbose = invoke(["--verbose", *args])
    assert isinstance(verbose.exception, error_type), (type(verbose.exception), verbose.exception)
    if workspace is not None:
        assert snapshot(workspace) == before, "a failing command wrote or changed files"
    return CliError(res, msg)


def expect_usage(args: Sequence[str | Path], *needles: str, workspace: Path | None = None) -> Result:
    """A usage error: exit 2, click's message on stderr naming ``needles``, nothing written."""
    before = snapshot(workspace) if workspace is not None else None
    res = invoke(args)
    assert res.exit_code == 2, (res.exit_code, res.output)
    for n in needles:
        assert n.lower() in res.stderr.lower(), (n, res.stderr)
    assert "Traceback" not in res.output
    if workspace is not None:
        assert snapshot(workspace) == before
    return res
