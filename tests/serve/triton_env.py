"""A real tritonserver for the tests: the binary and Python backend that the ``nvidia-pytriton`` wheel bundles.

That wheel needs numpy < 2 and a Python built with a shared libpython (Debian's system Python works; a
pyenv-built one does not), so it gets its own virtual environment, built once and cached in ``.cache/`` at the
repository root (ignored by git). :func:`triton_env` skips the test, saying why, where it cannot be set up.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "triton"
PACKAGES = ["numpy<2", "onnxruntime", "pyyaml", "tokenizers"]
PYTRITON = "nvidia-pytriton==0.7.0"


@dataclass
class TritonEnv:
    python: Path
    site: Path
    server: Path  # a copy of the bundled tritonserver tree with the stub for this Python

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["LD_LIBRARY_PATH"] = str(self.site / "nvidia_pytriton.libs")
        env["PATH"] = f"{self.python.parent}:{env['PATH']}"  # the stub's embedded Python finds the venv this way
        return env


def _shared_python() -> tuple[Path, str] | None:
    for exe in ("/usr/bin/python3.11", "/usr/bin/python3.12", "/usr/bin/python3.10", "/usr/bin/python3"):
        if not Path(exe).exists():
            continue
        probe = subprocess.run([exe, "-c", "import sysconfig, sys, venv; print(sysconfig.get_config_var("
                                "'Py_ENABLE_SHARED'), f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.split()[0] == "1":
            return Path(exe), probe.stdout.split()[1]
    return None


def triton_env() -> TritonEnv:
    """The cached environment, built on first use (a minute: the wheel is 55 MB); skips when impossible."""
    found = _shared_python()
    if found is None:
        pytest.skip("no Python with a shared libpython and venv for tritonserver's Python backend "
                    "(apt-get install -y python3 python3-venv)")
    exe, version = found
    venv = CACHE / f"py{version}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers build it once
        python = venv / "bin" / "python"
        site = venv / "lib" / f"python{version}" / "site-packages"
        ready = venv / ".ready"
        if not ready.exists():
            shutil.rmtree(venv, ignore_errors=True)
            steps = [[str(exe), "-m", "venv", str(venv)],
                     [str(python), "-m", "pip", "install", "-q", *PACKAGES],
                     [str(python), "-m", "pip", "install", "-q", "--no-deps", PYTRITON]]
            for cmd in steps:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    pytest.skip(f"cannot set up tritonserver's environment ({' '.join(cmd[-2:])}): "
                                f"{done.stderr.strip()[-300:]}")
            dist = site / "pytriton" / "tritonserver"
            server = venv / "tritonserver"
            shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
            shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub",
                        server / "backends" / "python" / "triton_python_backend_stub")
            ready.touch()
        if not (site / "tokenizers").is_dir():  # environments built before decoder bundles were served
            done = subprocess.run([str(python), "-m", "pip", "install", "-q", "tokenizers"], capture_output=True,
                                  text=True, timeout=600)
            if done.returncode != 0:
                pytest.skip(f"cannot install tokenizers in tritonserver's environment: {done.stderr.strip()[-300:]}")
        # eecompile from this checkout, for the Python models that import it
        (site / "eecompile-src.pth").write_text(f"{ROOT}\n")
    return TritonEnv(python, site, venv / "tritonserver")


class TritonServer:
    """``tritonserver`` on free loopback ports for one model repository; a context manager."""

    def __init__(self, env: TritonEnv, repository: Path, ports: tuple[int, int, int], log: Path,
                 exit_on_error: bool = True, extra_args: tuple[str, ...] = ()) -> None:
        self.env, self.repository, self.log = env, repository, log
        self.extra_args = extra_args
        self.http, self.grpc, self.metrics = ports
        self.exit_on_error = exit_on_error
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> TritonServer:
        s = self.env.server
        cmd = [str(s / "bin" / "tritonserver"), f"--model-repository={self.repository}",
               f"--backend-directory={s / 'backends'}", f"--cache-directory={s / 'caches'}",
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", f"--http-port={self.http}",
               f"--grpc-port={self.grpc}", f"--metrics-port={self.metrics}", "--allow-metrics=false",
               f"--exit-on-error={'true' if self.exit_on_error else 'false'}", "--log-verbose=0", "--exit-timeout-secs=3",
               *self.extra_args]
        out = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, env=self.env.env(), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 90
        url = f"http://127.0.0.1:{self.http}/v2/health/{'ready' if self.exit_on_error else 'live'}"
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tritonserver exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise AssertionError(f"tritonserver did not get ready in 90 s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
