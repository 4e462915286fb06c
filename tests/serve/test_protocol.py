"""The generate request's checks (``POST /v1/generate`` and the Triton decoder model read requests through them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from eecompile.errors import DataError
from eecompile.serve.protocol import generate_request, parse_generate

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
