"""Command-line misuse: usage errors exit 2 with click's message; user errors exit 1 with one line; a bug
inside eecompile still gives one line (and the traceback with --verbose). The real exit codes are checked in a
subprocess, as a shell script would see them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eecompile.errors import BackendError, DataError, SpecError
from tests.bad_inputs.util import expect_error, expect_usage, snapshot


def test_unknown_command_is_a_usage_error(ws: Path) -> None:
    expect_usage(["frobnicate"], "No such command 'frobnicate'", workspace=ws)


def test_unknown_option_is_a_usage_error(ws: Path) -> None:
    expect_usage(["compile", ws / "spec.yaml", "-o", ws / "o.eebundle", "--forse"], "No such option", "--forse",
                 workspace=ws)


def test_missing_output_option_is_a_usage_error(ws: Path) -> None:
    expect_usage(["compile", ws / "spec.yaml"], "Missing option", "--output", workspace=ws)


def test_batch_that_is_not_a_number_is_a_usage_error(ws: Path) -> None:
    expect_usage(["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "o.npz", "--batch", "ten"],
                 "--batch", "'ten' is not a valid integer", workspace=ws)


def test_unknown_policy_is_a_usage_error(ws: Path) -> None:
    expect_usage(["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "o.npz", "--policy", "fast"],
                 "--policy", "compact", workspace=ws)


def test_thresholds_of_the_wrong_count(ws: Path) -> None:
    # One value sets every exit (as the runner takes it); three for two exits is the wrong count.
    expect_error(["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "o.npz", "--thresholds",
                  "0.9,0.8,0.7"], SpecError, "--thresholds", "3 values for 2 early exits", "one per exit", workspace=ws)


def test_thresholds_that_are_not_numbers(ws: Path) -> None:
    expect_error(["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "o.npz",
                  "--thresholds", "0.9,sometimes"], SpecError, "'sometimes'", "'never'/'always'", workspace=ws)


@pytest.mark.parametrize("argv", [
    ["run", "{b}", "--data", "{d}", "-o", "{o}", "--batch", "0"],
    ["run", "{b}", "--data", "{d}", "-o", "{o}", "--threads", "0"],
    ["verify", "{b}", "--batch", "0"],
    ["bench", "{b}", "--data", "{d}", "--repeats", "0"],
    ["build", "{b}", "--backend", "onnxruntime", "--max-batch", "0"],
    ["build", "{b}", "--backend", "onnxruntime", "--opt-batch", "-3"],
    ["serve", "{b}", "--port", "70000"],
], ids=["run-batch", "run-threads", "verify-batch", "bench-repeats", "build-max-batch", "build-opt-batch",
        "serve-port"])
def test_a_number_out_of_range_is_a_usage_error(ws: Path, argv: list[str]) -> None:
    """Every count option is checked by click before anything runs: exit 2, the option named, its range."""
    paths = {"b": str(ws / "b.eebundle"), "d": str(ws / "data.npz"), "o": str(ws / "o.npz")}
    argv = [a.format(**paths) for a in argv]
    expect_usage(argv, argv[-2], "is not in the range", workspace=ws)


@pytest.mark.parametrize(("extra", "named"), [
    (["--temperature", "0.5"], "--temperature only applies to sampling"),
    (["--seed", "3"], "--seed only applies to sampling"),
    (["--temperature", "0.5", "--seed", "3"], "--temperature and --seed only apply to sampling"),
], ids=["temperature", "seed", "both"])
def test_sampling_options_without_sample_are_a_usage_error(ws: Path, extra: list[str], named: str) -> None:
    """`generate --temperature T` without --sample used to decode greedily without a word."""
    expect_usage(["generate", ws / "b.eebundle", "--prompt", "hi", "--max-new-tokens", "3", *extra], named,
                 "add --sample", workspace=ws)


@pytest.mark.parametrize("command", [["run", "-o", "{o}"], ["bench"]])
def test_steps_on_a_bundle_without_a_loop(ws: Path, command: list[str]) -> None:
    """--steps is a loop bundle's: on a chain run once it is refused, not ignored."""
    argv = [command[0], ws / "b.eebundle", "--data", ws / "data.npz",
            *[a.format(o=ws / "o.npz") for a in command[1:]], "--steps", "3"]
    expect_error(argv, DataError, "--steps", "for loop bundles", "runs its chain once", workspace=ws)


def test_build_with_an_impossible_batch_range(ws: Path) -> None:
    """ORT engines used to record opt > max without a word."""
    expect_error(["build", ws / "b.eebundle", "--backend", "onnxruntime", "--max-batch", "4", "--opt-batch", "8"],
                 BackendError, "--max-batch must be >= 1", "--opt-batch in [1, --max-batch]", workspace=ws)


def test_unknown_backend(ws: Path) -> None:
    expect_error(["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "o.npz", "--backend", "tpu"],
                 BackendError, "'tpu'", "onnxruntime or tensorrt", workspace=ws)


def test_a_bug_inside_still_gives_one_line(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw exception from inside the library (a bug) is one line naming it, not a traceback; --verbose
    re-raises it so the traceback can be reported."""
    import eecompile.compiler

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("ee0.out.logits")

    monkeypatch.setattr(eecompile.compiler, "compile_model", broken)
    e = expect_error(["compile", ws / "spec.yaml", "-o", ws / "o.eebundle"], KeyError, "internal error",
                     "KeyError", "ee0.out.logits", "--verbose", "report", workspace=ws)
    assert "Traceback" not in e.result.stderr


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eecompile.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_exit_codes_as_a_shell_sees_them(ws: Path) -> None:
    """0 success, 1 user error (one line on stderr, no traceback), 2 usage error."""
    ok = _cli("compile", "spec.yaml", "-o", "new.eebundle", cwd=ws)
    assert ok.returncode == 0, ok.stderr
    assert (ws / "new.eebundle" / "manifest.yaml").is_file()

    before = snapshot(ws)
    user = _cli("compile", "spec.yaml", "-o", "new.eebundle", cwd=ws)
    assert user.returncode == 1
    assert user.stderr.strip().count("\n") == 0 and user.stderr.startswith("error: new.eebundle"), user.stderr
    assert "--force" in user.stderr

    usage = _cli("compile", "spec.yaml", cwd=ws)
    assert usage.returncode == 2
    assert "Missing option" in usage.stderr and "Traceback" not in usage.stderr
    assert snapshot(ws) == before
