"""`eecompile serve` as a user runs it: a bundle that fails to load ends the command with the loader's error
(no server left hanging); a good bundle is served until SIGINT, then everything it started is gone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serve.client import alive, descendants, get, predict_json
from tests.serve.conftest import free_port, mixed_inputs

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eecompile.cli", "serve", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_damaged_bundle_ends_serve_with_the_loaders_error(served_bundle: Path, tmp_path: Path) -> None:
    from eecompile.bundle import Bundle
    from eecompile.errors import BundleError

    bad = tmp_path / "bad.eebundle"
    shutil.copytree(served_bundle, bad)
    seg = bad / "segments" / "seg1.onnx"
    seg.write_bytes(seg.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError) as loader:
        Bundle.load(bad)
    proc = _serve(str(bad), "--port", str(free_port()))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == f"error: {loader.value}"


def test_missing_bundle(tmp_path: Path) -> None:
    proc = _serve(str(tmp_path / "nope.eebundle"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "nope.eebundle" in err and "Traceback" not in err


def test_max_steps_on_a_bundle_without_a_loop_ends_serve(served_bundle: Path) -> None:
    proc = _serve(str(served_bundle), "--max-steps", "8", "--port", str(free_port()))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == (f"error: --max-steps 8: only for loop bundles (compiled from a spec with "
                                            f"'loop:'); {served_bundle.name} runs its chain once: leave it out")


@pytest.mark.slow
def test_serve_until_sigint(served_bundle: Path) -> None:
    import eecompile

    port = free_port()
    proc = _serve(str(served_bundle), "--port", str(port), "--max-batch-size", "8", "--cpus-per-replica", "1")
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if get(f"{url}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        x = mixed_inputs(4, seed=3)
        status, doc = predict_json(f"{url}/predict", {"image": x})
        assert status == 200
        with eecompile.load(served_bundle) as runner:
            local = runner.run({"image": x})
        assert doc["exit_index"] == local.exit_index.tolist()
        np.testing.assert_allclose(np.array(doc["outputs"]["logits"]), local.outputs["logits"], rtol=1e-4, atol=1e-5)
        status, body = get(f"{url}/health")
        assert json.loads(body)["status"] == "ok"
        kids = descendants(proc.pid)
        assert kids  # Ray's processes
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, err[-2000:]
    assert "serving" in err
    deadline = time.time() + 20
    left: list[int] = []
    while time.time() < deadline:
        left = alive(kids)
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"processes left after SIGINT: {left}"


def test_public_key_refuses_an_unsigned_bundle_and_accepts_a_signed_one(served_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from eecompile.errors import SignatureError
    from eecompile.serve.ray_app import ServeOptions, load_runner
    from eecompile.signing import sign_bundle, verify_bundle

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    unsigned = tmp_path / "unsigned.eebundle"
    shutil.copytree(served_bundle, unsigned)
    with pytest.raises(SignatureError) as refused:
        verify_bundle(unsigned, public)
    proc = _serve(str(unsigned), "--port", str(free_port()), "--public-key", str(public))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.strip().splitlines()[-1] == f"error: {refused.value}"

    signed = tmp_path / "signed.eebundle"
    shutil.copytree(served_bundle, signed)
    sign_bundle(signed, private)
    runner = load_runner(ServeOptions(bundle=str(signed), public_key=str(public)))  # what each replica does
    x = mixed_inputs(3)
    np.testing.assert_array_equal(runner.run({"image": x}).exit_index,
                                  load_runner(ServeOptions(bundle=str(served_bundle))).run({"image": x}).exit_index)
