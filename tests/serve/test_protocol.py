"""The request checks: ``POST /v1/generate``'s (the Triton decoder model reads requests through them too) and a loop
bundle's ``steps`` and ``loop_threshold`` on ``POST /v1/predict``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from eecompile.bundle import TensorInfo
from eecompile.errors import DataError, SpecError
from eecompile.serve.batching import group_requests
from eecompile.serve.protocol import PredictRequest, generate_request, parse_generate, parse_request

GREEDY_TEMPERATURE = ('request: temperature only applies to sampling: add "sample": true (without it decoding is '
                      'greedy and it would be ignored).')


@pytest.mark.parametrize(("fields", "message"), [
    ({"temperature": 0.5}, GREEDY_TEMPERATURE),
    ({"temperature": 1.0, "sample": False}, GREEDY_TEMPERATURE),  # given explicitly, even at its default
    ({"seed": 3}, 'request: seed only applies to sampling: add "sample": true'),
    ({"temperature": 0.5, "seed": 3}, 'request: temperature and seed only apply to sampling: add "sample": true'),
])
def test_sampling_options_without_sampling_are_refused(fields: dict, message: str) -> None:
    body = json.dumps({"prompt": "hi", "max_new_tokens": 2, **fields}).encode()
    with pytest.raises(DataError) as e:
        parse_generate(body, n_exits=1)
    assert str(e.value).startswith(message)


def test_sampling_options_with_sampling_or_null_are_taken() -> None:
    r = generate_request({"prompt": "hi", "sample": True, "temperature": 0.5, "seed": 3}, n_exits=1)
    assert (r.sample, r.temperature, r.seed) == (True, 0.5, 3)
    r = generate_request({"prompt": "hi", "temperature": None, "seed": None}, n_exits=1)  # null: not given
    assert (r.sample, r.temperature, r.seed) == (False, 1.0, None)


def test_the_endpoint_and_the_cli_say_the_same(tmp_path: Path) -> None:
    from eecompile.cli import cli

    res = CliRunner().invoke(cli, ["generate", str(tmp_path), "--prompt", "hi", "--temperature", "0.5"])
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    http = GREEDY_TEMPERATURE.removeprefix("request: ").replace("temperature", "--temperature", 1)
    assert http.replace('"sample": true', "--sample") in said, said


# ------------------------------------------------------------------------------------------- loop bundles

X = [TensorInfo("x", "float32", ["batch", 4])]


def _predict(doc: dict, loop: bool = True) -> PredictRequest:
    return parse_request(json.dumps(doc).encode(), "application/json", X, 0, loop=loop)


def test_loop_requests_take_steps_and_a_loop_threshold_and_group_by_them() -> None:
    """A loop call runs every row for one N (a per-step input's value at step i depends on N): requests share a
    call only with the same steps and loop threshold."""
    x = {"x": [[1.0, 2.0, 3.0, 4.0]]}
    reqs = [_predict({"inputs": x}), _predict({"inputs": x, "steps": 5}), _predict({"inputs": x}),
            _predict({"inputs": x, "steps": 5, "loop_threshold": [3, 1.5]}), _predict({"inputs": x, "steps": 5}),
            _predict({"inputs": x, "loop_threshold": "never"})]
    assert [(r.steps, r.loop_threshold) for r in reqs[:4]] == [(None, None), (5, None), (None, None), (5, (3.0, 1.5))]
    assert group_requests(reqs, X) == [[0, 2], [1, 4], [3], [5]]
    buf = io.BytesIO()
    np.savez(buf, x=np.ones((2, 4), np.float32), steps=np.array(7), loop_threshold=np.array([0.5]))
    r = parse_request(buf.getvalue(), "application/octet-stream", X, 0, loop=True)
    assert (r.n, r.steps, r.loop_threshold) == (2, 7, 0.5)


@pytest.mark.parametrize(("fields", "loop", "message"), [
    ({"steps": 3}, False, "request: steps is for loop bundles (compiled from a spec with 'loop:'); this bundle runs "
                          "its chain once"),
    ({"steps": 3, "loop_threshold": 0.5}, False, "request: steps and loop_threshold are for loop bundles"),
    ({"steps": 0}, True, "request: steps is 0; expected a positive integer"),
    ({"steps": 2.5}, True, "request: steps is 2.5; expected a positive integer"),
    ({"steps": True}, True, "request: steps is True; expected a positive integer"),
    ({"loop_threshold": "sometimes"}, True, "request: loop_threshold is 'sometimes'; expected a number, a list"),
    ({"loop_threshold": []}, True, "request: loop_threshold is []; expected a number, a list"),
    ({"loop_threshold": [1, "x"]}, True, "request: loop_threshold is [1, 'x']"),
    ({"loops": 3}, True, "request: unknown fields ['loops']"),
])
def test_bad_loop_fields_are_one_clear_error(fields: dict, loop: bool, message: str) -> None:
    with pytest.raises(DataError) as e:
        _predict({"inputs": {"x": [[1, 2, 3, 4]]}, **fields}, loop=loop)
    assert str(e.value).startswith(message), str(e.value)


def test_a_number_sent_as_a_json_string_is_refused_naming_the_field_and_its_forms() -> None:
    """JSON's numeric fields take JSON numbers only: a quoted loop_threshold is refused as a quoted threshold or
    steps is (the message says what was sent and how to send it); an .npz's string array is read as a number."""
    x = {"x": [[1, 2, 3, 4]]}
    with pytest.raises(DataError) as e:
        _predict({"inputs": x, "loop_threshold": "0.5"})
    assert str(e.value) == ("request: loop_threshold is '0.5'; expected a number, a list of stage numbers (e.g. "
                            "[7.5, 5, 2.5]), 'never' or 'always' ('0.5' is a JSON string: send the number unquoted, "
                            "0.5)")
    with pytest.raises(DataError, match=r"loop_threshold is \[3, '1\.5'\];.*'1\.5' is a JSON string"):
        _predict({"inputs": x, "loop_threshold": [3, "1.5"]})
    with pytest.raises(SpecError, match=r"^request: thresholds\[0\]: '0\.9' is neither a finite number nor "
                                        r"'never'/'always' \('0\.9' is a JSON string: send the number unquoted"):
        parse_request(json.dumps({"inputs": x, "thresholds": ["0.9"]}).encode(), "application/json", X, 1)
    with pytest.raises(DataError, match=r"^request: steps is '5'; expected a positive integer"):
        _predict({"inputs": x, "steps": "5"})
    buf = io.BytesIO()
    np.savez(buf, x=np.ones((1, 4), np.float32), loop_threshold=np.array("0.5"))
    assert parse_request(buf.getvalue(), "application/octet-stream", X, 0, loop=True).loop_threshold == 0.5


def test_steps_over_the_endpoints_limit_are_refused_naming_it_and_the_option() -> None:
    x = {"x": [[1, 2, 3, 4]]}
    body = json.dumps({"inputs": x, "steps": 9}).encode()
    with pytest.raises(DataError) as e:
        parse_request(body, "application/json", X, 0, loop=True, max_steps=8)
    assert str(e.value) == ("request: steps is 9; this endpoint runs at most 8 steps per request (serve --max-steps); "
                            "ask for fewer")
    assert parse_request(json.dumps({"inputs": x, "steps": 8}).encode(), "application/json", X, 0, loop=True,
                         max_steps=8).steps == 8


def test_a_per_step_input_in_a_request_gets_the_message_run_gives(tmp_path: Path) -> None:
    """`t`, fed by the loop at every step, is a model input: a request giving it was answered "arrays 't' are not
    model inputs; the model's inputs are ['x']"; it now gets `eecompile run`'s message for the same array."""
    import eecompile
    from eecompile.runtimes.loop import LoopRunner
    from tests.loops.models import export_shift, shift_loop_spec

    spec = shift_loop_spec(tmp_path, export_shift(tmp_path / "shift.onnx"))
    bundle = eecompile.compile_model(spec, tmp_path / "l.eebundle", engines=False)
    with LoopRunner(bundle) as runner:
        body = json.dumps({"inputs": {"x": [[1.0, 2.0, 3.0, 4.0]], "t": [0.5]}}).encode()
        with pytest.raises(DataError) as e:
            parse_request(body, "application/json", runner.inputs, 0, loop=True, refuse_names=runner.refuse_step_inputs)
        assert str(e.value).startswith("request: 't' is a per-step input of the loop (loop.inputs.t, source "
                                       "'linspace')"), e.value
        ok = parse_request(json.dumps({"inputs": {"x": [[1.0, 2.0, 3.0, 4.0]]}}).encode(), "application/json",
                           runner.inputs, 0, loop=True, refuse_names=runner.refuse_step_inputs)
        assert ok.n == 1
