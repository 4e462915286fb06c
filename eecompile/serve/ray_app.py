"""A bundle behind Ray Serve: ``POST /v1/predict`` (or, for a decoder bundle, ``POST /v1/generate``) and
``GET /v1/health``, with dynamic batching.

Requests that arrive one by one are gathered by ``@serve.batch`` (up to ``max_batch_size`` samples, waiting
at most ``batch_wait_ms`` after the first), stacked, and run through the compacting runner in one call. Each
request is answered as soon as its own samples have exited: the runner reports rows as they leave the chain
(:mod:`eecompile.serve.batching`), so easy requests do not wait for the deep segments of hard ones.

One replica runs one batch at a time (its runner on one worker thread) while the next batch gathers. Replicas
are Ray actors: ``replicas=N`` fixes the count, ``autoscaling=(min, max)`` lets Serve scale on the number of
requests in flight. Ray restarts a replica that dies; requests that were on it fail with HTTP 500 and can be
retried.

A decoder bundle's replica instead owns a :class:`~eecompile.serve.decoding.DecodeScheduler`: requests join
its running decode batch between steps and leave it when their row finishes (iteration-level batching), and
``"stream": true`` answers with server-sent events, one per step that gave the row tokens.

Metrics (Ray's metrics agent, Prometheus format, next to Serve's own): ``eecompile_requests`` (by HTTP
status), ``eecompile_request_latency_ms`` (histogram: percentiles), ``eecompile_exit_samples`` (by exit),
``eecompile_batch_samples`` (samples per runner call; rows per decode step); decoder bundles also
``eecompile_generated_tokens``, ``eecompile_decode_tokens_per_s``, ``eecompile_decode_occupancy``,
``eecompile_decode_waiting``, ``eecompile_time_to_first_token_ms``.

Ray is imported here at module level: import this module only where Ray is wanted (the CLI does, lazily).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from eecompile.errors import BackendError, EECompileError, SpecError
from eecompile.serve.batching import Answer, group_requests, run_group
from eecompile.serve.decoding import Busy, DecodeScheduler, RowSink, StepFigures
from eecompile.serve.protocol import (
    JSON,
    PredictRequest,
    RequestTooLarge,
    encode_response,
    error_body,
    parse_generate,
    parse_request,
)

log = logging.getLogger(__name__)

ROUTE_PREFIX = "/v1"
LATENCY_BOUNDARIES_MS = [1.0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_BOUNDARIES = [1.0, 2, 4, 8, 16, 32, 64, 128, 256, 512]
SSE = "text/event-stream"
# A loop request's steps hold the replica for their whole run: by default a request may ask for up to this many times
# the bundle's loop.steps (room for a finer schedule than the default, while one request costs at most this many
# default requests).
MAX_STEPS_FACTOR = 4


@dataclass(frozen=True)
class ServeOptions:
    """What ``eecompile serve`` passes to each replica (plain data: it is pickled to the Ray actors)."""

    bundle: str
    backend: str = "onnxruntime"
    backend_options: dict[str, Any] = field(default_factory=dict)
    max_batch_size: int = 32  # samples per runner call (and per request)
    batch_wait_ms: float = 5.0
    max_body_bytes: int = 64 << 20
    public_key: str | None = None  # PEM: every replica refuses a bundle not signed by its owner
    max_waiting: int = 256  # decoder bundles: requests waiting for a row beyond the running batch (then 503)
    max_steps: int | None = None  # loop bundles: most steps a request may ask for (None: MAX_STEPS_FACTOR x loop.steps)


def load_runner(options: ServeOptions) -> Any:
    """The runner a replica serves with (the bundle's loader checks every file's hash, and with
    ``public_key`` the bundle's signature): the chain runner, or for a decoder bundle the
    :class:`~eecompile.runtimes.lm.DecoderRunner` (ONNX Runtime)."""
    from eecompile import load
    from eecompile.bundle import Bundle

    bundle = Bundle.load(options.bundle, public_key=options.public_key)
    if bundle.manifest.decoder:
        from eecompile.runtimes.lm import DecoderRunner

        return DecoderRunner(bundle, threads=options.backend_options.get("threads"))
    return load(bundle if options.backend == "onnxruntime" else options.bundle, backend=options.backend,
                **options.backend_options)


def max_steps_of(options: ServeOptions, runner: Any) -> int | None:
    """The most steps a request to a loop bundle may ask for (None for a bundle without a loop). Raises SpecError
    for ``max_steps`` on a bundle without a loop, or below its ``loop.steps`` (a request that gives no steps runs
    that many)."""
    loop = None if _is_decoder(runner) else runner.manifest.loop
    if loop is None:
        if options.max_steps is not None:
            raise SpecError(f"--max-steps {options.max_steps}: only for loop bundles (compiled from a spec with "
                            f"'loop:'); {Path(options.bundle).name} runs its chain once: leave it out")
        return None
    default = int(loop["steps"])
    if options.max_steps is None:
        return MAX_STEPS_FACTOR * default
    if options.max_steps < default:
        raise SpecError(f"--max-steps {options.max_steps} is below the bundle's loop.steps ({default}), which a "
                        f"request that gives no steps runs; give --max-steps {default} or more")
    return options.max_steps


def _is_decoder(runner: Any) -> bool:
    return hasattr(runner, "generate") and not hasattr(runner, "run")


def _samples(items: list[PredictRequest]) -> int:
    return sum(r.n for r in items)


@serve.deployment(name="eecompile", max_ongoing_requests=256, health_check_period_s=5)
class EarlyExitDeployment:
    """One replica: a loaded runner plus the batch queue in front of it."""

    def __init__(self, options: ServeOptions) -> None:
        self._cfg = options
        self.runner = load_runner(options)
        self.decoder = _is_decoder(self.runner)
        self.max_steps = max_steps_of(options, self.runner)
        self.n_early_exits = len(self.runner.exits) if self.decoder else self.runner.manifest.n_early_exits
        # Thresholds a request gives: one per gate (a bundle with jump exits has a boundary segment without one);
        # the exits /health counts are these and the final one (the boundary is no exit, as `inspect` shows it).
        self.n_thresholds = self.n_early_exits if self.decoder else len(self.runner.manifest.thresholds)
        batcher: Any = self.predict  # @serve.batch's wrapper
        batcher.set_max_batch_size(options.max_batch_size)
        batcher.set_batch_wait_timeout_s(options.batch_wait_ms / 1000.0)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eecompile-runner")
        self._busy: asyncio.Future[Any] | None = None
        self._requests = metrics.Counter("eecompile_requests", description="Requests answered, by HTTP status.",
                                         tag_keys=("status",))
        self._latency = metrics.Histogram("eecompile_request_latency_ms", boundaries=LATENCY_BOUNDARIES_MS,
                                          description="Time from request to answer inside the replica (ms).")
        self._exits = metrics.Counter("eecompile_exit_samples", description="Samples answered at each exit.",
                                      tag_keys=("exit",))
        self._batch = metrics.Histogram("eecompile_batch_samples", boundaries=BATCH_BOUNDARIES,
                                        description="Samples in each runner call (/predict); rows in each "
                                                    "decode step (/generate).")
        self.scheduler: DecodeScheduler | None = None
        if self.decoder:
            self._tokens = metrics.Counter("eecompile_generated_tokens", description="Tokens answered by /generate.")
            self._tps = metrics.Gauge("eecompile_decode_tokens_per_s",
                                      description="Tokens emitted per second of decoding, over the last second.")
            self._occupancy = metrics.Gauge("eecompile_decode_occupancy",
                                            description="Rows in the running batch / its capacity, last step.")
            self._waiting = metrics.Gauge("eecompile_decode_waiting",
                                          description="Requests waiting for a row in the running batch.")
            self._ttft = metrics.Histogram("eecompile_time_to_first_token_ms", boundaries=LATENCY_BOUNDARIES_MS,
                                           description="From a request's arrival to its first token (ms).")
            self._window: list[tuple[float, int, float]] = []  # (end, tokens, seconds) of the last second's steps
            self._loop: asyncio.AbstractEventLoop | None = None
            self.scheduler = DecodeScheduler(self.runner, max_batch=options.max_batch_size,
                                             max_waiting=options.max_waiting, on_step=self._on_step,
                                             on_first_token=self._on_first_token)

    def _on_step(self, f: StepFigures) -> None:  # the scheduler's thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._record_step, f)

    def _on_first_token(self, seconds: float) -> None:  # the scheduler's thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._ttft.observe, seconds * 1000.0)

    def _record_step(self, f: StepFigures) -> None:
        now = time.perf_counter()
        self._window = [w for w in self._window if now - w[0] < 1.0] + [(now, f.tokens, f.seconds)]
        busy = sum(w[2] for w in self._window)
        self._tps.set(sum(w[1] for w in self._window) / busy if busy > 0 else 0.0)
        self._occupancy.set(f.rows / f.max_batch)
        self._waiting.set(f.waiting)
        self._batch.observe(f.rows)

    def __del__(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close(timeout=2.0)

    def check_health(self) -> None:
        if self.runner is None:
            raise BackendError("the bundle is not loaded")

    async def __call__(self, request: Request) -> Response:
        t0 = time.perf_counter()
        path = request.url.path.rstrip("/")
        route = "generate" if self.decoder else "predict"
        if path.endswith("/health") and request.method in ("GET", "HEAD"):
            inputs = ["prompt", "token_ids"] if self.decoder else [t.name for t in self.runner.inputs]
            return self._json(200, {"status": "ok", "bundle": Path(self._cfg.bundle).name, "route": route,
                                    "exits": self.n_thresholds + 1, "inputs": inputs, "pid": os.getpid(),
                                    "replica": _replica_id(),
                                    **({} if self.max_steps is None else {"max_steps": self.max_steps})})
        other = "predict" if self.decoder else "generate"
        if path.endswith(f"/{other}") and request.method == "POST":
            return self._error(400, self._wrong_kind(other), t0)
        if not path.endswith(f"/{route}"):
            return self._error(404, f"no route {request.url.path}; this bundle answers POST {ROUTE_PREFIX}/{route} "
                                    f"and GET {ROUTE_PREFIX}/health", t0)
        if request.method != "POST":
            return self._error(405, f"{ROUTE_PREFIX}/{route} takes POST", t0)
        if self.decoder:
            return await self._generate_http(request, t0)
        try:
            body = await self._read_body(request)
            req = parse_request(body, request.headers.get("content-type"), self.runner.inputs,
                                self.n_thresholds, max_samples=self._cfg.max_batch_size,
                                loop=self.runner.manifest.loop is not None,
                                refuse_names=getattr(self.runner, "refuse_step_inputs", None),
                                max_steps=self.max_steps)
            holder = await self.predict(req)
            answer: Answer = await holder[0]
        except RequestTooLarge as e:
            return self._error(413, str(e), t0)
        except EECompileError as e:
            return self._error(400, str(e), t0)
        content, media = encode_response(answer.outputs, answer.exit_index, req.as_npz, answer.present,
                                         answer.jumped, answer.steps)
        for k, c in enumerate(np.bincount(answer.exit_index if answer.exit_index is not None else [],
                                          minlength=self.n_early_exits + 1)):
            if c:
                self._exits.inc(int(c), tags={"exit": str(k)})
        self._done(200, t0)
        return Response(content, status_code=200, media_type=media)

    def _wrong_kind(self, asked: str) -> str:
        """The CLI's message for the same mismatch (``eecompile run`` on a decoder bundle, ``eecompile generate``
        on a classifier bundle), naming the endpoint."""
        name = Path(self._cfg.bundle).name
        if asked == "predict":
            return (f"{name}: a decoder bundle (kind: decoder); {ROUTE_PREFIX}/predict takes bundles compiled from "
                    f"a classifier spec: generate text with POST {ROUTE_PREFIX}/generate")
        return (f"{name}: not a decoder bundle (it has no decoder section); {ROUTE_PREFIX}/generate takes a decoder "
                f"compiled with a key/value cache from a spec with 'kind: decoder'; this bundle answers POST "
                f"{ROUTE_PREFIX}/predict")

    async def _generate_http(self, request: Request, t0: float) -> Response:
        """Iteration-level batching: the request's row joins the replica's running batch at the next decode step
        and leaves it when it finishes; the answer (or, with ``"stream": true``, each step's tokens as a
        server-sent event) goes out as soon as its own row has it."""
        assert self.scheduler is not None
        self._loop = asyncio.get_running_loop()
        try:
            req = parse_generate(await self._read_body(request), self.n_early_exits)
            sink = _AsyncSink(self._loop)
            ticket = self.scheduler.submit(req, sink)
        except RequestTooLarge as e:
            return self._error(413, str(e), t0)
        except Busy as e:
            return self._error(503, str(e), t0)
        except EECompileError as e:
            return self._error(400, str(e), t0)
        handed_over = False
        try:
            kind, payload = await sink.queue.get()  # admitted (the decoder took its values) or failed
            if kind == "failed":
                handed_over = True
                return self._failure(payload, t0)
            if req.stream:
                handed_over = True  # the stream owns the row from here
                return StreamingResponse(self._stream(sink, ticket, t0), media_type=SSE,
                                         headers={"Cache-Control": "no-cache"})
            while True:
                kind, payload = await sink.queue.get()
                if kind == "finished":
                    handed_over = True
                    self._tokens.inc(len(payload["token_ids"]))
                    self._done(200, t0)
                    return self._json(200, payload)
                if kind == "failed":
                    handed_over = True
                    return self._failure(payload, t0)
        finally:
            if not handed_over:  # the client went away (the handler was cancelled): free its row
                self.scheduler.cancel(ticket)

    async def _stream(self, sink: _AsyncSink, ticket: Any, t0: float) -> Any:
        """Server-sent events: ``data: {"token_ids": [...], "text": ...}`` for each step with new tokens, then
        ``data: {...the final object..., "finished": true}`` (or ``data: {"error": "..."}``)."""
        import json

        assert self.scheduler is not None
        done = False
        try:
            while True:
                kind, payload = await sink.queue.get()
                if kind == "tokens":
                    ids, text = payload
                    yield f"data: {json.dumps({'token_ids': ids, 'text': text})}\n\n"
                elif kind == "finished":
                    done = True
                    self._tokens.inc(len(payload["token_ids"]))
                    self._done(200, t0)
                    yield f"data: {json.dumps({**payload, 'finished': True})}\n\n"
                    return
                elif kind == "failed":
                    done = True
                    self._done(500, t0)
                    yield f"data: {json.dumps({'error': str(payload)})}\n\n"
                    return
        finally:
            if not done:  # the client closed the stream
                self.scheduler.cancel(ticket)

    def _failure(self, error: BaseException, t0: float) -> Response:
        """A refused or failed row: 400 for bad values (the decoder's DataError), 500 for a failed step."""
        if isinstance(error, EECompileError) and not isinstance(error, BackendError):
            return self._error(400, str(error), t0)
        return self._error(500, str(error), t0)

    async def _read_body(self, request: Request) -> bytes:
        limit = self._cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"request: body of {int(declared)} bytes is over the limit of {limit} bytes "
                                  f"(--max-body-mb); split the request")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"request: body over the limit of {limit} bytes (--max-body-mb); split "
                                      f"the request")
            chunks.append(chunk)
        return b"".join(chunks)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_samples)
    async def predict(self, requests: list[PredictRequest]) -> list[tuple[asyncio.Future[Answer]]]:
        """Start one batch on the runner thread and hand each caller a future for its own answer.

        Returns once the previous batch has finished, so the next batch gathers while this one runs."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Answer]] = [loop.create_future() for _ in requests]
        if self._busy is not None:
            await asyncio.wait([self._busy])
        self._busy = loop.run_in_executor(self._pool, self._run_batch, requests, futures, loop)
        return [(f,) for f in futures]

    def _run_batch(self, requests: Sequence[PredictRequest], futures: Sequence[asyncio.Future[Answer]],
                   loop: asyncio.AbstractEventLoop) -> None:
        """On the runner thread: one runner call per group of requests with equal thresholds."""
        for group in group_requests(requests, self.runner.inputs):
            members = [requests[i] for i in group]

            def done(j: int, answer: Answer, group: list[int] = group) -> None:
                loop.call_soon_threadsafe(_resolve, futures[group[j]], answer)

            try:
                run_group(self.runner, members, done)
                self._batch.observe(sum(r.n for r in members))
            except Exception as e:  # every caller of the group gets it (EECompileError: HTTP 400)
                for i in group:
                    loop.call_soon_threadsafe(_fail, futures[i], e)

    def _json(self, status: int, doc: dict[str, Any]) -> Response:
        import json

        return Response(json.dumps(doc).encode(), status_code=status, media_type=JSON)

    def _error(self, status: int, message: str, t0: float) -> Response:
        self._done(status, t0)
        return Response(error_body(message), status_code=status, media_type=JSON)

    def _done(self, status: int, t0: float) -> None:
        self._requests.inc(tags={"status": str(status)})
        self._latency.observe((time.perf_counter() - t0) * 1000.0)


def _replica_id() -> str | None:
    """``app#deployment#tag`` of this replica (its Ray actor's name ends with it), None outside Serve."""
    try:
        ctx = serve.get_replica_context()
    except Exception:  # RayServeException outside a replica
        return None
    return f"{ctx.app_name}#{ctx.deployment}#{ctx.replica_tag}"


class _AsyncSink(RowSink):
    """Forwards the scheduler's callbacks (its loop thread) to a request's asyncio queue, as (kind, payload)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def _put(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))

    def admitted(self) -> None:
        self._put("admitted", None)

    def failed(self, error: BaseException) -> None:
        self._put("failed", error)

    def tokens(self, token_ids: list[int], text: str | None) -> None:
        self._put("tokens", (token_ids, text))

    def finished(self, result: dict[str, Any]) -> None:
        self._put("finished", result)


def _resolve(future: asyncio.Future[Answer], answer: Answer) -> None:
    if not future.done():
        future.set_result(answer)


def _fail(future: asyncio.Future[Answer], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def build_app(options: ServeOptions, replicas: int = 1, autoscaling: tuple[int, int] | None = None,
              cpus_per_replica: float = 1.0) -> Any:
    """The Serve application for ``options`` (bind it with :func:`run_app` or ``serve.run``)."""
    config: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus_per_replica}}
    if autoscaling is not None:
        lo, hi = autoscaling
        config["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                        "target_ongoing_requests": max(2, options.max_batch_size // 2)}
    else:
        config["num_replicas"] = replicas
    return EarlyExitDeployment.options(**config).bind(options)  # type: ignore[attr-defined]


def run_app(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
            autoscaling: tuple[int, int] | None = None, cpus_per_replica: float = 1.0, name: str = "eecompile",
            route_prefix: str = ROUTE_PREFIX) -> Any:
    """Start Serve's HTTP proxy on ``host:port`` (once per Ray instance) and deploy the bundle as application
    ``name`` under ``route_prefix``; returns once every replica answers.

    Ray must be initialised (``ray.init``). Raises BackendError when the replicas cannot start."""
    serve.start(http_options={"host": host, "port": port})
    try:
        return serve.run(build_app(options, replicas, autoscaling, cpus_per_replica), name=name,
                         route_prefix=route_prefix)
    except RuntimeError as e:
        raise BackendError(f"the Serve deployment did not start ({str(e).strip().splitlines()[0]}); see Ray's "
                           f"logs (/tmp/ray/session_latest/logs)") from e


def serve_bundle(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
                 autoscaling: tuple[int, int] | None = None, cpus_per_replica: float = 1.0,
                 address: str | None = None, ready: Any = None) -> None:
    """``eecompile serve``: check the bundle here (its loader's error ends the command), start or join Ray,
    deploy, and serve until SIGINT/SIGTERM; then shut Serve down (and Ray, when it was started here)."""
    runner = load_runner(options)  # fail fast with the loader's own message, before any server starts
    route = "generate" if _is_decoder(runner) else "predict"
    if hasattr(runner, "close"):
        runner.close()
    max_steps_of(options, runner)  # and with a --max-steps that does not fit the bundle
    import ray

    started_here = address is None
    if address is not None:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    else:
        # Enough CPUs for every replica even on a small machine (Ray would otherwise keep some pending).
        needed = int(np.ceil(cpus_per_replica * (autoscaling[1] if autoscaling else replicas)))
        ray.init(include_dashboard=False, logging_level=logging.WARNING, num_cpus=max(os.cpu_count() or 1, needed))
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_app(options, host, port, replicas, autoscaling, cpus_per_replica)
        if ready is not None:
            ready(f"http://{host}:{port}{ROUTE_PREFIX}", route)
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:
            serve.shutdown()
        finally:
            if started_here:
                ray.shutdown()


__all__ = ["EarlyExitDeployment", "ServeOptions", "build_app", "run_app", "serve_bundle"]
