"""The wire format of ``POST /v1/predict``, shared by the Ray Serve deployment and the Triton model.

Request, either
  * JSON (``Content-Type: application/json``): ``{"inputs": {NAME: nested lists}, "thresholds": [...]}``;
    ``thresholds`` is optional (the bundle's), else one entry per early exit: a number, "never" or "always";
  * an ``.npz`` archive (``Content-Type: application/octet-stream``): one array per model input, named after
    it, samples along its batch axis; thresholds may ride along as a ``thresholds`` string array.
Response: ``{"outputs": {NAME: nested lists}, "exit_index": [int, ...]}`` (JSON), or an ``.npz`` with each
final output and ``exit_index`` (int64) when the request was an ``.npz``. A bundle's end-only outputs
(``manifest.end_only``) have no row for samples that left early: JSON gives ``null`` in their place and
``"present": {NAME: [bool, ...]}``; the ``.npz`` has NaN (0 for integers) there and ``present.NAME``.

A loop bundle (``manifest.loop``) takes ``"steps"`` (a positive integer, default the bundle's ``loop.steps``) and
``"loop_threshold"`` (a number, a list of stage numbers, "never" or "always"; default the bundle's) beside
``thresholds`` (its layer exits'), in the ``.npz`` as arrays of those names; it answers with the loop's results
(``loop.results``: the fed-back outputs, and the commit output) in ``outputs`` and ``"steps"`` (the steps each
sample ran) in place of ``exit_index``.

Arrays are checked exactly as ``eecompile run`` checks an ``.npz`` (:func:`eecompile.runtimes.data.check_array`), so a
wrong name, dtype or shape gets the same one-line message; JSON numbers have no dtype, so integers are accepted
for float inputs. Numpy only: this module runs inside Triton's Python backend too.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eecompile.bundle import TensorInfo
from eecompile.errors import DataError, SpecError
from eecompile.runtimes.data import batch_size_of, check_array, check_finite
from eecompile.runtimes.lm import SAMPLING_OPTIONS, unused_sampling_options

JSON = "application/json"
NPZ = "application/octet-stream"
WHERE = "request"  # prefixes every message, as the file name does for `eecompile run`


class RequestTooLarge(DataError):
    """The body or the sample count is over the endpoint's limit (HTTP 413)."""


@dataclass
class PredictRequest:
    """One checked request: arrays in the model's dtypes, its sample count, thresholds (None: the bundle's)."""

    feeds: dict[str, np.ndarray]
    n: int
    thresholds: tuple[float | str, ...] | None
    as_npz: bool
    steps: int | None = None  # loop bundles: the loop's step count (None: the bundle's)
    loop_threshold: float | str | tuple[float, ...] | None = None  # loop bundles (None: the bundle's)

    def group_key(self, inputs: Sequence[TensorInfo]) -> tuple[Any, ...]:
        """Requests with equal keys can share one runner call: same thresholds, same batch-free inputs, and for a
        loop the same steps and loop threshold (one call runs every row for the same N: a per-step input's value
        at step i depends on N)."""
        fixed = tuple((t.name, self.feeds[t.name].tobytes()) for t in inputs if t.batch_axis is None)
        return (self.thresholds, fixed, self.steps, self.loop_threshold)


def parse_request(body: bytes, content_type: str | None, inputs: Sequence[TensorInfo], n_early_exits: int,
                  max_samples: int | None = None, loop: bool = False,
                  refuse_names: Callable[[Sequence[str], str], None] | None = None,
                  max_steps: int | None = None) -> PredictRequest:
    """Parse and check a request body against the model ``inputs``; ``loop``: the bundle is a loop bundle (the
    request may give ``steps``, at most ``max_steps``, and ``loop_threshold``). ``refuse_names(names, where)``:
    called with the request's array names before they are checked against ``inputs`` (a loop's
    :meth:`~eecompile.runtimes.loop.LoopRunner.refuse_step_inputs`: a per-step input gets ``eecompile run``'s message,
    not "not a model input").

    Raises :class:`~eecompile.errors.DataError` (HTTP 400) for anything that does not fit the model, with the
    message ``eecompile run`` gives for the same arrays in a file, and for ``steps``/``loop_threshold`` that are
    malformed, over ``max_steps`` or sent to a bundle without a loop; :class:`RequestTooLarge` (413) when the request
    holds more than ``max_samples`` samples; SpecError (400) for a bad threshold list. The loop threshold's range is
    checked by the runner (:class:`~eecompile.runtimes.loop.LoopRunner`), per gate kind."""
    kind = (content_type or JSON).split(";")[0].strip().lower()
    if kind == NPZ:
        raw, options = _read_npz(body)
        as_npz = True
    elif kind in (JSON, "text/json", ""):
        raw, options = _read_json(body)
        as_npz = False
    else:
        raise DataError(f"{WHERE}: content type '{kind}' is not supported; send {JSON} or an .npz as {NPZ}")
    steps, loop_threshold = _loop_options(options, loop, max_steps)
    if refuse_names is not None:
        refuse_names(list(raw), WHERE)
    feeds, n = check_arrays(raw, inputs, from_json=not as_npz)
    if max_samples is not None and n > max_samples:
        raise RequestTooLarge(f"{WHERE}: {n} samples; this endpoint takes at most {max_samples} per request "
                              f"(--max-batch-size); split the request")
    return PredictRequest(feeds, n, _thresholds(options.get("thresholds"), n_early_exits), as_npz, steps,
                          loop_threshold)


LOOP_FIELDS = ("steps", "loop_threshold")


def _loop_options(options: dict[str, Any], loop: bool, max_steps: int | None = None
                  ) -> tuple[int | None, float | str | tuple[float, ...] | None]:
    """``steps`` (at most ``max_steps``) and ``loop_threshold`` of a request, checked for form (DataError naming
    the field)."""
    given = [k for k in LOOP_FIELDS if options.get(k) is not None]
    if given and not loop:
        raise DataError(f"{WHERE}: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} for loop bundles "
                        f"(compiled from a spec with 'loop:'); this bundle runs its chain once: leave "
                        f"{'it' if len(given) == 1 else 'them'} out")
    steps = options.get("steps")
    if isinstance(steps, np.ndarray) and steps.size == 1 and steps.dtype.kind in "iu":  # an .npz's np.savez(steps=5)
        steps = int(steps.reshape(()))
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise DataError(f"{WHERE}: steps is {_plain(steps)!r}; expected a positive integer (the loop's step count)")
    if steps is not None and max_steps is not None and steps > max_steps:
        raise DataError(f"{WHERE}: steps is {steps}; this endpoint runs at most {max_steps} steps per request "
                        f"(serve --max-steps); ask for fewer")
    t = options.get("loop_threshold")
    if isinstance(t, np.ndarray):  # an .npz: a number, a word or the stage values
        t = [_number_or_word(str(v)) for v in np.atleast_1d(t).tolist()]
        t = t[0] if len(t) == 1 else t
    if t is None or (isinstance(t, str) and t in ("never", "always")):
        return steps, t
    values = t if isinstance(t, list) else [t]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise DataError(f"{WHERE}: loop_threshold is {_plain(t)!r}; expected a number, a list of stage numbers "
                        f"(e.g. [7.5, 5, 2.5]), 'never' or 'always'{_quoted_numbers(values)}")
    return steps, (tuple(float(v) for v in values) if isinstance(t, list) else float(t))


def _quoted_numbers(values: Sequence[Any]) -> str:
    """A hint for numbers sent as JSON strings ("0.5"): every numeric field of a JSON request takes JSON numbers
    only (an .npz carries words and numbers as string arrays, and those are read as numbers where they parse)."""
    quoted = [v for v in values if isinstance(v, str) and isinstance(_number_or_word(v), float)
              and math.isfinite(float(v))]
    return f" ({quoted[0]!r} is a JSON string: send the number unquoted, {float(quoted[0]):g})" if quoted else ""


def _plain(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


def check_arrays(raw: dict[str, Any], inputs: Sequence[TensorInfo], from_json: bool = False
                 ) -> tuple[dict[str, np.ndarray], int]:
    """The model's inputs from ``raw`` (name -> array or nested lists), checked, and the sample count.

    Raises DataError naming the array: missing or unknown names, dtype, shape, NaN/Inf, disagreeing counts."""
    names = [t.name for t in inputs]
    missing = [n for n in names if n not in raw]
    if missing:
        raise DataError(f"{WHERE}: no array named {', '.join(repr(m) for m in missing)} (a model input); "
                        f"the request has {', '.join(repr(k) for k in raw) or 'no arrays'}")
    extra = [k for k in raw if k not in names]
    if extra:
        raise DataError(f"{WHERE}: arrays {', '.join(repr(k) for k in extra)} are not model inputs; the model's "
                        f"inputs are {names}")
    feeds = {t.name: _checked(t, raw[t.name], from_json) for t in inputs}
    return feeds, batch_size_of(feeds, inputs, WHERE)


def _read_json(body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{WHERE}: the body is not valid JSON ({e}); send "
                        f'{{"inputs": {{NAME: nested lists}}}}') from e
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
        raise DataError(f'{WHERE}: expected a JSON object {{"inputs": {{NAME: nested lists}}, "thresholds": '
                        f"optional list}}")
    unknown = sorted(set(doc) - {"inputs", "thresholds", *LOOP_FIELDS})
    if unknown:
        raise DataError(f"{WHERE}: unknown fields {unknown}; a request has 'inputs' and optional 'thresholds' (and "
                        f"for a loop bundle 'steps' and 'loop_threshold')")
    return doc["inputs"], {k: doc[k] for k in ("thresholds", *LOOP_FIELDS) if k in doc}


def _read_npz(body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, AttributeError) as e:
        raise DataError(f"{WHERE}: cannot read the body as an .npz ({e}); save inputs with np.savez") from e
    options = {k: raw.pop(k) for k in ("thresholds", *LOOP_FIELDS) if k in raw}
    if "thresholds" in options:
        options["thresholds"] = [_number_or_word(str(v)) for v in np.atleast_1d(options["thresholds"]).tolist()]
    return raw, options


def _number_or_word(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _checked(info: TensorInfo, value: Any, from_json: bool) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise DataError(f"{WHERE}: array '{info.name}' is not a rectangular array of numbers ({e})") from e
    want = np.dtype(info.dtype)
    if from_json and arr.dtype.kind in "iu" and want.kind == "f":
        arr = arr.astype(want)  # JSON integers for a float input: 0 means 0.0
    if arr.dtype.kind in "OSU":
        raise DataError(f"{WHERE}: array '{info.name}' holds non-numbers ({arr.dtype}), the model expects {want}")
    if from_json and arr.dtype.kind in "iu" and want.kind in "iu":
        arr = _int_in_range(info, arr, want)
    elif from_json and arr.dtype.kind == "f" and want.kind == "f":
        arr = arr.astype(want)
    return check_finite(info, check_array(info, arr, WHERE), WHERE)


def _int_in_range(info: TensorInfo, arr: np.ndarray, want: np.dtype) -> np.ndarray:
    limits = np.iinfo(want)
    if arr.size and (arr.min() < limits.min or arr.max() > limits.max):
        raise DataError(f"{WHERE}: array '{info.name}' has values outside {want}'s range")
    return arr.astype(want)


def thresholds_of(value: Any, n_early_exits: int) -> tuple[float | str, ...] | None:
    """A request's thresholds: None (the bundle's), a list, or text like ``"0.9,never"`` (Triton request
    parameters); one entry per early exit, a finite number, "never" or "always". Raises SpecError."""
    if isinstance(value, str) and "," in value:
        value = [_number_or_word(v.strip()) for v in value.split(",")]
    elif isinstance(value, str) and value not in ("never", "always"):
        value = _number_or_word(value.strip())
    return _thresholds(value, n_early_exits)


def _thresholds(value: Any, n_early_exits: int) -> tuple[float | str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float)):
        value = [value] * n_early_exits
    if not isinstance(value, list) or len(value) != n_early_exits:
        got = len(value) if isinstance(value, list) else type(value).__name__
        raise SpecError(f"{WHERE}: thresholds: got {got} values for {n_early_exits} early exits; give one per "
                        f"exit (a number, 'never' or 'always')")
    out: list[float | str] = []
    for i, t in enumerate(value):
        if isinstance(t, str) and t in ("never", "always"):
            out.append(t)
        elif isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
            out.append(float(t))
        else:
            raise SpecError(f"{WHERE}: thresholds[{i}]: {t!r} is neither a finite number nor 'never'/'always'"
                            f"{_quoted_numbers([t])}")
    return tuple(out)


def encode_response(outputs: dict[str, np.ndarray], exit_index: np.ndarray | None, as_npz: bool,
                    present: dict[str, tuple[np.ndarray, int]] | None = None,
                    jumped: np.ndarray | None = None, steps: np.ndarray | None = None) -> tuple[bytes, str]:
    """The response body and its content type. ``present``: end-only outputs, name -> (bool [n] mask of the
    samples that have a row, batch axis): the .npz carries ``present.<name>`` beside NaN rows; JSON gives
    ``null`` for each absent sample's row and ``"present": {name: [bool, ...]}``. ``jumped`` (bundles with jump
    exits): each sample's jump exit, -1 for none, as ``jumped`` beside ``exit_index``. A loop's answer has
    ``steps`` (int [n], the steps each sample ran) and no ``exit_index`` (None)."""
    present = present or {}
    counts = {k: np.asarray(v).astype(np.int64) for k, v in
              (("exit_index", exit_index), ("jumped", jumped), ("steps", steps)) if v is not None}
    if as_npz:
        buf = io.BytesIO()
        masks = {f"present.{k}": m for k, (m, _) in present.items()}
        np.savez(buf, **outputs, **masks, **counts)  # type: ignore[arg-type]
        return buf.getvalue(), NPZ
    doc: dict[str, object] = {"outputs": {k: _rows_or_null(v, present.get(k)) for k, v in outputs.items()},
                              **{k: v.tolist() for k, v in counts.items()}}
    if present:
        doc["present"] = {k: m.astype(bool).tolist() for k, (m, _) in present.items()}
    return json.dumps(doc).encode(), JSON


def _rows_or_null(a: np.ndarray, present: tuple[np.ndarray, int] | None) -> object:
    if present is None or present[0].all():
        return a.tolist()
    mask, axis = present
    rows = [np.take(a, i, axis=axis).tolist() if ok else None for i, ok in enumerate(mask)]
    if axis == 0:
        return rows
    return {"batch_axis": axis, "rows": rows}  # rows per sample (batch first) when the batch is not axis 0


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


@dataclass
class GenerateRequest:
    """One checked ``POST /v1/generate`` body (decoder bundles)."""

    prompt: str | list[int]
    max_new_tokens: int
    mode: str = "none"
    thresholds: tuple[float | str, ...] | None = None
    draft_tokens: int | None = None
    sample: bool = False
    temperature: float = 1.0
    seed: int | None = None
    stream: bool = False

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys decode in the same running batch (batch-wide options; the rest is per row)."""
        return (self.mode, self.thresholds, self.draft_tokens)


GENERATE_FIELDS = ("prompt", "token_ids", "max_new_tokens", "mode", "thresholds", "draft_tokens", "sample",
                   "temperature", "seed", "stream")


def parse_generate(body: bytes, n_exits: int) -> GenerateRequest:
    """``{"prompt": text | "token_ids": [int], "max_new_tokens": 32, "mode": "none"|"speculative"|"exit",
    "thresholds": [...], "draft_tokens": k, "sample": false, "temperature": 1.0, "seed": null,
    "stream": false}`` (``prompt`` may also be a list of token ids; ``temperature`` and ``seed`` only with
    ``"sample": true``, as ``eecompile generate`` takes them only with ``--sample``).

    Raises DataError / SpecError (HTTP 400) for a malformed body or sampling options without sampling (the
    CLI's message, :func:`eecompile.runtimes.lm.unused_sampling_options`); the decoder checks the values further
    (mode, max_new_tokens >= 1, prompt and max_new_tokens within the cache, token ids in the vocabulary)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f'{WHERE}: the body is not valid JSON ({e}); send {{"prompt": "...", '
                        f'"max_new_tokens": 32}}') from e
    return generate_request(doc, n_exits)


def generate_request(doc: Any, n_exits: int) -> GenerateRequest:
    """A generate request from its fields (the JSON body, or Triton's tensors and parameters as a dict)."""
    if not isinstance(doc, dict) or ("prompt" in doc) == ("token_ids" in doc):
        raise DataError(f'{WHERE}: expected a JSON object with one of "prompt" (text) or "token_ids" (a list '
                        f'of ints), and "max_new_tokens"')
    unknown = sorted(set(doc) - set(GENERATE_FIELDS))
    if unknown:
        raise DataError(f"{WHERE}: unknown fields {unknown}; a generate request has {list(GENERATE_FIELDS)}")
    field_name = "prompt" if "prompt" in doc else "token_ids"
    prompt = doc[field_name]
    ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ids) or not prompt:
        raise DataError(f"{WHERE}: {field_name} must be a non-empty string or list of token ids")
    if field_name == "token_ids" and not ids:
        raise DataError(f"{WHERE}: token_ids must be a non-empty list of ints; send text as \"prompt\"")

    def typed(name: str, kinds: tuple[type, ...], default: Any) -> Any:
        v = doc.get(name, default)
        if v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
            raise DataError(f"{WHERE}: {name} is {v!r}; expected {' or '.join(k.__name__ for k in kinds)}")
        return v

    max_new = typed("max_new_tokens", (int,), 32)
    sample = bool(typed("sample", (bool,), False))
    temperature = typed("temperature", (int, float), None)  # null: the default, as if not given
    given = [name for name in SAMPLING_OPTIONS if doc.get(name) is not None]
    if (unused := unused_sampling_options(given, sample, '"sample": true')) is not None:
        raise DataError(f"{WHERE}: {unused}")
    return GenerateRequest(
        prompt=prompt, max_new_tokens=int(max_new) if max_new is not None else 32,
        mode=typed("mode", (str,), "none"), thresholds=_thresholds(doc.get("thresholds"), n_exits),
        draft_tokens=typed("draft_tokens", (int,), None), sample=sample,
        temperature=1.0 if temperature is None else float(temperature), seed=typed("seed", (int,), None),
        stream=bool(typed("stream", (bool,), False)))
