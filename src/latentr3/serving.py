"""`latentr3 serve`: an HTTP recommendation service (FastAPI + uvicorn) with continuous batching.

One engine thread owns the model and runs `decoding.engine.DecodingEngine` (the decoder offline
evaluation and `Recommender.recommend` use); each HTTP request submits its user(s) and awaits an
asyncio future, so concurrent requests are decoded together and each is answered as soon as its own
beams finish.  `--workers N` runs N such processes on one port (SO_REUSEPORT, see `_supervise`).

    POST /v1/recommend         {"history": [...], "k": 10, "exclude_history": false,
                                "allow_free_text": false, "explain": false}
                               -> {"items": [{"title", "item_ids", "score"}], "latency_ms"}
    POST /v1/recommend/batch   {"histories": [[...], ...], ...same options}
                               -> {"results": [{"items": [...]}, ...], "latency_ms"}
    GET  /healthz              model loaded, queue depth, requests decoding (503 while draining)
    GET  /v1/model             checkpoint, catalogue size, decoding settings
    GET  /metrics              Prometheus text (prometheus_client)

Errors are JSON {"error": <kind>, "message": <text naming the field>, ...}: 400 malformed JSON,
413 body over --max-body-bytes, 422 invalid field / unknown title (with close matches), 429 queue full
(Retry-After), 503 shutting down, 504 past --timeout-s.  SIGTERM drains: new requests get 503,
accepted ones are answered, then the process exits 0.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name local classes

import asyncio
import json
import logging
import math
import os
import queue
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Union

log = logging.getLogger("latentr3.serve")


@dataclass
class ServeSettings:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_users: int = 16      # users decoded at once (each with num_beams beams)
    # Free batch places that trigger an admission (one prefill for the waiting users that fit); an empty
    # batch admits at once.  0 = max(1, max_batch_users // 4): batching the prefills of 4 users halves
    # their cost per user (tiny demo model, CPU), while a request that finds the batch below 3/4 full
    # still starts at once.
    admit_at: int = 0
    max_queue: int = 256           # users waiting for a place in the batch before 429
    timeout_s: float = 30.0        # a request still unanswered after this gets 504 (its decoding is dropped)
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    max_history: int = 512         # entries per history
    max_histories: int = 64        # histories in one batch request
    num_beams: int = 10            # beams per user; also the largest k
    catalogue: str | None = None
    device: str | None = None
    dtype: str = "auto"
    threads: int = 0               # torch threads per worker (0 = torch's default)
    # Worker processes, each with its own copy of the model and its own engine, sharing the port
    # (SO_REUSEPORT: the kernel spreads connections over them).  One engine's step is mostly small tensor
    # operations issued from Python, so one engine cannot keep two cores busy (its thread holds the GIL for
    # much of each step; a second engine *thread* in the same process adds ~15 %, a second process ~100 %):
    # on a CPU with C cores, C workers x 1 thread is the fastest layout under load.  Each costs the model's
    # memory; a request is batched only with the requests of its own worker; /healthz and /metrics describe
    # the worker that answers them.
    workers: int = 1
    log_level: str = "info"


def check_settings(s: ServeSettings) -> None:
    """ConfigError naming the first option out of range."""
    from .config import ConfigError

    rules = [("--max-batch-users", s.max_batch_users >= 1, "must be >= 1"),
             ("--admit-at", 0 <= s.admit_at <= s.max_batch_users,
              f"must be in [0, max-batch-users={s.max_batch_users}]"),
             ("--max-queue", s.max_queue >= 0, "must be >= 0"),
             ("--timeout-s", s.timeout_s > 0, "must be > 0"),
             ("--max-body-bytes", s.max_body_bytes > 0, "must be > 0"),
             ("--num-beams", s.num_beams >= 1, "must be >= 1"),
             ("--port", 0 <= s.port <= 65535, "must be in [0, 65535]"),
             ("--threads", s.threads >= 0, "must be >= 0"),
             ("--workers", s.workers >= 1, "must be >= 1")]
    for name, ok, why in rules:
        if not ok:
            raise ConfigError(f"{name} {why}, got {getattr(s, name[2:].replace('-', '_'))}")


# ----------------------------------------------------------------------------------- request schemas
def _schemas(s: ServeSettings):
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

    Entry = Union[StrictStr, StrictInt]
    History = Annotated[list[Entry], Field(min_length=1, max_length=s.max_history,
                                           description="titles (str) or item ids (int), oldest first")]

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        k: StrictInt = Field(10 if s.num_beams >= 10 else s.num_beams, ge=1, le=s.num_beams,
                             description=f"titles returned (1..{s.num_beams}, the server's --num-beams)")
        exclude_history: StrictBool = Field(False, description="never recommend a title of the history")
        allow_free_text: StrictBool = Field(False, description="accept history titles not in the catalogue")
        explain: StrictBool = Field(False, description="add the latent thought's attention share per "
                                                       "history title")

    class RecommendRequest(Options):
        history: History
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"history": ["Toy Story (1995)", "Heat (1995)"], "k": 5},
            {"history": [1, 50, 181], "k": 10, "exclude_history": True}]})

    class BatchRequest(Options):
        histories: list[History] = Field(min_length=1, max_length=s.max_histories)
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"histories": [["Toy Story (1995)"], [1, 50]], "k": 3}]})

    class Item(BaseModel):
        title: str
        item_ids: list[int]
        score: float = Field(description="sum(log p) / length ** length_penalty")

    class Explanation(BaseModel):
        title: str
        attention: float = Field(description="share of LatentRATT's attention on this title's tokens")

    class Recommendations(BaseModel):
        items: list[Item]
        explanation: list[Explanation] | None = None

    class RecommendResponse(Recommendations):
        latency_ms: float
        model_config = ConfigDict(json_schema_extra={"examples": [
            {"items": [{"title": "Star Wars (1977)", "item_ids": [50], "score": -0.41}], "latency_ms": 23.5}]})

    class BatchResponse(BaseModel):
        results: list[Recommendations]
        latency_ms: float

    return RecommendRequest, BatchRequest, RecommendResponse, BatchResponse


# ----------------------------------------------------------------------------------- metrics
class _Metrics:
    def __init__(self, engine, state: dict, worker: int = 0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()      # no *_created series: they double the page and nobody graphs them
        self.registry = r = CollectorRegistry()
        self.requests = Counter("latentr3_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("latentr3_errors", "requests that failed, by kind", ["kind"], registry=r)
        self.latency = Histogram("latentr3_request_latency_seconds", "time from request to answer",
                                 ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch = Histogram("latentr3_batch_users", "users in the decoding batch at each beam step",
                               registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.users = Counter("latentr3_users", "users (histories) decoded", registry=r)
        Gauge("latentr3_queue_depth", "users waiting for a place in the batch",
              registry=r).set_function(lambda: engine.queue_depth)
        Gauge("latentr3_active_users", "users being decoded", registry=r).set_function(lambda: engine.active)
        Gauge("latentr3_requests_decoding", "recommend requests accepted and not yet answered",
              registry=r).set_function(lambda: state["decoding"])
        Gauge("latentr3_worker", "index of the worker process answering this scrape (serve --workers)",
              registry=r).set(worker)
        r.register(_EngineCounters(engine))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCounters:
    """The engine's own counters (kept by the engine thread) as Prometheus counters."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("latentr3_decode_steps", "beam steps run", value=self.engine.steps)
        yield CounterMetricFamily("latentr3_users_abandoned", "users dropped unanswered (client gone, deadline)",
                                  value=self.engine.abandoned)


# ----------------------------------------------------------------------------------- ASGI gate
_ENDPOINTS = ("/v1/recommend", "/v1/recommend/batch", "/v1/model", "/healthz", "/metrics")


class _Gate:
    """ASGI middleware: counts requests in flight and by status, times them, and answers a body over
    `limit` bytes with 413 before the app reads it.

    Written by hand because neither Starlette nor uvicorn limits the request body (Content-Length is
    checked first; a chunked body is counted while it is buffered, never more than `limit` bytes), and
    a pure ASGI middleware leaves the client's disconnect message visible to the handler (which cancels
    its decoding), unlike Starlette's BaseHTTPMiddleware.
    """

    def __init__(self, app, limit: int, metrics, state: dict):
        self.app, self.limit, self.metrics, self.state = app, limit, metrics, state

    async def _reject(self, send, size: str) -> None:
        self.metrics.errors.labels("body_too_large").inc()
        body = json.dumps({"error": "body_too_large", "field": "body",
                           "message": f"request body {size} is over the limit of {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        self.state["inflight"] += 1
        try:
            await self._call(scope, receive, send_)
        finally:
            self.state["inflight"] -= 1
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            if endpoint.startswith("/v1/recommend"):
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _call(self, scope, receive, send):
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send, f"of {int(length)} bytes")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":          # client gone before the body arrived
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(send, "(chunked)")
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()                     # then: the client's disconnect, if it comes

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------- the app
def create_app(recommender, settings: ServeSettings, worker: int = 0):
    """The FastAPI app around one Recommender; its engine thread starts and drains with the app.

    worker: this process's index among `settings.workers` (shown by /healthz and /metrics).
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    from .decoding.engine import DeadlineExceeded, DecodeRequest, EngineClosed, QueueFull
    from .recommend import UnknownItemError

    check_settings(settings)
    RecommendRequest, BatchRequest, RecommendResponse, BatchResponse = _schemas(settings)
    holder: dict = {}

    def on_step(size: int) -> None:
        holder["metrics"].batch.observe(size)

    if not settings.admit_at:
        settings.admit_at = max(1, settings.max_batch_users // 4)
    engine = recommender.new_engine(settings.num_beams, settings.max_batch_users, admit_at=settings.admit_at,
                                    max_queue=settings.max_queue, on_step=on_step)
    # inflight: HTTP requests of any endpoint being handled; decoding: recommend requests whose users are
    # in the engine and not yet answered (what a drain still owes)
    state = {"draining": False, "inflight": 0, "decoding": 0, "latency_ewma": 0.0}
    metrics = holder["metrics"] = _Metrics(engine, state, worker)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title="latentr3", version=_version(), lifespan=lifespan,
                  description="LatentR3 recommendations: catalogue titles from a history, decoded with a "
                              "catalogue-constrained beam search after the model's latent thought; "
                              "concurrent requests share one continuously batched decoder.")
    app.state.engine, app.state.settings, app.state.serve_state = engine, settings, state

    def error(status: int, kind: str, message: str, headers=None, **extra):
        metrics.errors.labels(kind).inc()
        return JSONResponse({"error": kind, "message": message, **extra}, status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            e = next(e for e in errs if e.get("type") == "json_invalid")
            where = e.get("loc", ["body", "?"])[-1]
            return error(400, "malformed_json", f"body is not valid JSON ({e.get('ctx', {}).get('error', '')} "
                                                f"at position {where})", field="body")
        detail = _merge_union_errors(
            [{"field": _field(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
             for e in errs])
        message = "; ".join(f"{d['field']}: {d['message']}" for d in detail)
        return error(422, "invalid_request", message, field=detail[0]["field"] if detail else "body",
                     detail=detail)

    def retry_after() -> str:
        # about the time for the queue ahead to be decoded (>= 1 s)
        per_user = state["latency_ewma"] or 1.0
        return str(max(1, math.ceil(per_user * (engine.queue_depth / settings.max_batch_users + 1))))

    async def decode(request: Request, histories: list[list], body) -> tuple[list, float] | JSONResponse:
        t0 = time.perf_counter()
        if state["draining"] or engine.closed:
            return error(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if body.explain and not recommender.model.num_latent:
            return error(422, "invalid_request", "explain: this checkpoint has no latent thought (num_latent = 0)",
                         field="explain")
        reqs = []
        for h, history in enumerate(histories):
            try:
                titles = recommender.history_titles(history, body.allow_free_text)
            except UnknownItemError as e:
                field = f"history[{e.index}]" if len(histories) == 1 and isinstance(body, RecommendRequest) \
                    else f"histories[{h}][{e.index}]"
                return error(422, "unknown_item", f"{field}: {e}", field=field, close_matches=e.close_matches)
            exclude = recommender.excluded_titles(titles) if body.exclude_history else ()
            req = DecodeRequest(recommender.prompt_ids(titles), body.k, exclude,
                                deadline=time.monotonic() + settings.timeout_s)
            req.history_titles = titles
            reqs.append(req)
        try:
            futures = engine.submit_many(reqs)
        except QueueFull as e:
            return error(429, "queue_full", str(e), {"Retry-After": retry_after()})
        except EngineClosed:
            return error(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        state["decoding"] += 1
        try:
            return await answer(request, reqs, futures, body, t0)
        finally:
            state["decoding"] -= 1

    async def answer(request: Request, reqs: list, futures: list, body,
                     t0: float) -> tuple[list, float] | JSONResponse:
        """Awaits the engine's futures of one accepted request (or the client's disconnect or the deadline)."""
        waiting = [asyncio.wrap_future(f) for f in futures]
        gone = asyncio.ensure_future(_disconnected(request))
        give_up = t0 + settings.timeout_s + 1.0     # the engine's own deadline fires first
        try:
            while not gone.done() and not all(w.done() for w in waiting):
                left = give_up - time.perf_counter()
                if left <= 0:
                    break
                await asyncio.wait([*(w for w in waiting if not w.done()), gone], timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not gone.done():
                gone.cancel()
        if not all(w.done() for w in waiting):
            for f in futures:
                f.cancel()                          # the engine drops them at its next step
            if gone.done():
                metrics.errors.labels("client_disconnected").inc()
                return Response(status_code=499)    # nobody reads it: the client has gone
            return error(504, "deadline_exceeded", f"no answer within timeout_s={settings.timeout_s}")
        if any(isinstance(w.exception(), DeadlineExceeded) for w in waiting):
            for f in futures:
                f.cancel()
            return error(504, "deadline_exceeded", f"no answer within timeout_s={settings.timeout_s}")
        for w in waiting:
            if w.exception() is not None:
                log.exception("decoding failed", exc_info=w.exception())
                return error(500, "internal", f"decoding failed: {w.exception()!r}")
        latency = time.perf_counter() - t0
        state["latency_ewma"] = 0.8 * state["latency_ewma"] + 0.2 * latency if state["latency_ewma"] else latency
        metrics.users.inc(len(reqs))
        out = []
        for req, w in zip(reqs, waiting):
            res = w.result()
            rec = {"items": [{"title": t, "item_ids": recommender.catalogue.items_with_title(t), "score": sc}
                             for t, sc in zip(res.titles, res.scores)]}
            if body.explain:
                try:        # in the thread that owns the model, between two beam steps
                    expl = await asyncio.wrap_future(engine.call(lambda t=req.history_titles: recommender.explain(t)))
                except EngineClosed:    # drained: no other thread uses the model any more
                    expl = recommender.explain(req.history_titles)
                rec["explanation"] = [{"title": t, "attention": a} for t, a in expl]
            out.append(rec)
        return out, latency

    @app.post("/v1/recommend", response_model=RecommendResponse, response_model_exclude_none=True,
              summary="top-k catalogue titles for one history",
              responses={400: {"description": "malformed JSON"}, 413: {"description": "body too large"},
                         422: {"description": "invalid field or unknown title (with close matches)"},
                         429: {"description": "queue full (Retry-After)"}, 503: {"description": "shutting down"},
                         504: {"description": "past the server's timeout"}})
    async def recommend(body: RecommendRequest, request: Request):
        res = await decode(request, [body.history], body)
        if not isinstance(res, tuple):
            return res
        (rec,), latency = res
        return {**rec, "latency_ms": latency * 1000}

    @app.post("/v1/recommend/batch", response_model=BatchResponse, response_model_exclude_none=True,
              summary="top-k catalogue titles for several histories (decoded together)")
    async def recommend_batch(body: BatchRequest, request: Request):
        res = await decode(request, body.histories, body)
        if not isinstance(res, tuple):
            return res
        recs, latency = res
        return {"results": recs, "latency_ms": latency * 1000}

    @app.get("/healthz", summary="model loaded, queue depth (503 while draining)")
    async def healthz():
        body = {"status": "draining" if state["draining"] else "ok", "model_loaded": True,
                "queue_depth": engine.queue_depth, "active_users": engine.active,
                "requests_decoding": state["decoding"],
                "worker": worker, "workers": settings.workers, "pid": os.getpid()}
        return JSONResponse(body, 503 if state["draining"] else 200)

    @app.get("/v1/model", summary="checkpoint, catalogue and decoding settings")
    async def model_info():
        cfg = recommender.decoding
        return {"checkpoint": settings.model, "catalogue": recommender.catalogue.path,
                "catalogue_items": len(recommender.catalogue), "catalogue_titles": len(recommender.trie.titles_unique),
                "num_latent": recommender.model.num_latent, "device": str(recommender.model.device),
                "dtype": str(next(recommender.model.parameters()).dtype).replace("torch.", ""),
                "decoding": {"num_beams": settings.num_beams, "max_k": settings.num_beams,
                             "length_penalty": cfg.length_penalty,
                             "shared_prefix_tokens": len(recommender.shared_prefix or [])},
                "serving": {k: v for k, v in asdict(settings).items()
                            if k in ("max_batch_users", "admit_at", "max_queue", "timeout_s", "max_body_bytes",
                                     "max_history", "max_histories", "workers", "threads")}}

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Gate, limit=settings.max_body_bytes, metrics=metrics, state=state)
    return app


async def _disconnected(request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _merge_union_errors(detail: list[dict]) -> list[dict]:
    """A history entry that is neither str nor int fails both members of the union: one error for it."""
    out, seen = [], {}
    for d in detail:
        if d["type"] in ("string_type", "int_type") and d["field"] in seen:
            prev = out[seen[d["field"]]]
            prev["message"], prev["type"] = "Input should be a title (string) or an item id (integer)", "entry_type"
            continue
        if d["type"] in ("string_type", "int_type"):
            seen[d["field"]] = len(out)
        out.append(dict(d))
    return out


def _field(loc) -> str:
    """('body', 'history', 2) -> 'history[2]'."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    # a union's member name (str / int) is not a field
    return out.replace(".str", "").replace(".int", "") or "body"


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------------- the process
def serve(settings: ServeSettings) -> int:
    """Loads the checkpoint, serves until SIGTERM / SIGINT, drains, returns 0 (several workers: `_supervise`)."""
    check_settings(settings)          # before the checkpoint is loaded
    if settings.workers > 1:
        return _supervise(settings)
    _build_server(settings).run()
    return 0


def _build_server(settings: ServeSettings, worker: int = 0) -> "_DrainingServer":
    """The checkpoint loaded and its app built, in a uvicorn server that drains on SIGTERM."""
    import torch
    import uvicorn

    from .recommend import Recommender

    if settings.threads:
        torch.set_num_threads(settings.threads)
    _configure_logging(settings, f" [worker {worker}]" if settings.workers > 1 else "")
    rec = Recommender.from_pretrained(settings.model, catalogue=settings.catalogue, device=settings.device,
                                      dtype=settings.dtype, num_beams=settings.num_beams)
    app = create_app(rec, settings, worker)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=settings.timeout_s + 5)
    log.info("latentr3 serve: %s on http://%s:%d (max_batch_users %d, max_queue %d, timeout %.1fs)",
             settings.model, settings.host, settings.port, settings.max_batch_users, settings.max_queue,
             settings.timeout_s)
    return _DrainingServer(config, app)


def _configure_logging(settings: ServeSettings, tag: str = "") -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")


# ----------------------------------------------------------------------------------- several workers
# By hand rather than `uvicorn --workers`: uvicorn's supervisor needs the app as an import string (ours is
# built around a loaded checkpoint), shares one listening socket (under light load one process tends to
# accept most connections, so a closed-loop client's connections land unevenly) and restarts a worker that
# fails while loading forever.  Here every worker loads its model, reports ready, and only when all are
# ready does each bind its own SO_REUSEPORT socket: from then on the kernel spreads new connections over
# them evenly by address hash.  SIGTERM / SIGINT is forwarded; each worker drains as a single server does.
def _bound_socket(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    """A TCP socket bound to host:port (SO_REUSEPORT: shared with the other workers)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP (without it
    # Nagle's algorithm and delayed ACKs add ~40 ms to a small answer)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _worker_main(settings: ServeSettings, worker: int, ready, go) -> None:
    """A worker process: load, report ready, wait until every worker is, then serve on its own socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the supervisor forwards a Ctrl-C as SIGTERM
    try:
        server = _build_server(settings, worker)
    except Exception as e:  # noqa: BLE001 - a bad checkpoint: say what is wrong, as the single server does
        log.error("worker %d cannot start: %s: %s", worker, type(e).__name__, e)
        sys.exit(2)
    ready.put(worker)
    go.wait()
    sock = _bound_socket(settings.host, settings.port)
    server.run(sockets=[sock])


def _supervise(settings: ServeSettings) -> int:
    """Starts settings.workers worker processes on one port; returns 0 when all drained and exited 0."""
    import multiprocessing as mp

    _configure_logging(settings)
    if settings.port == 0:
        log.error("--workers %d needs a fixed --port (with port 0 every worker would get its own)", settings.workers)
        return 2
    try:                              # the port must be free: the workers' SO_REUSEPORT binds would share it
        _bound_socket(settings.host, settings.port, reuse_port=False).close()
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, e)
        return 1
    ctx = mp.get_context("spawn")     # fresh interpreters: no forked torch thread pools
    ready, go = ctx.Queue(), ctx.Event()
    procs: dict[int, mp.process.BaseProcess] = {}
    stopping = []

    def start(i: int) -> None:
        procs[i] = ctx.Process(target=_worker_main, args=(settings, i, ready, go), name=f"latentr3-worker-{i}",
                               daemon=False)
        procs[i].start()

    def stop(sig, frame) -> None:
        if not stopping:
            log.info("%s: draining %d workers", signal.Signals(sig).name, len(procs))
        stopping.append(sig)
        for p in procs.values():
            if p.is_alive():
                p.terminate()         # SIGTERM: the worker drains

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(settings.workers):
        start(i)
    is_ready: set[int] = set()
    while not stopping:
        try:
            is_ready.add(ready.get(timeout=0.2))
        except queue.Empty:
            pass
        if len(is_ready) == settings.workers and not go.is_set():
            go.set()
            log.info("latentr3 serve: %d workers on http://%s:%d", settings.workers, settings.host, settings.port)
        for i, p in list(procs.items()):
            if p.exitcode is not None and not stopping:
                if not go.is_set():   # failed while loading: the others would fail the same way
                    log.error("worker %d exited with %s before it was ready; stopping", i, p.exitcode)
                    stop(signal.SIGTERM, None)
                    for q in procs.values():
                        q.join()
                    return p.exitcode if p.exitcode > 0 else 1
                log.error("worker %d exited with %s; starting a new one", i, p.exitcode)
                start(i)
    for p in procs.values():
        p.join()
    return 0 if all(p.exitcode == 0 for p in procs.values()) else 1


def _uvicorn_server():
    import uvicorn

    return uvicorn.Server


class _DrainingServer(_uvicorn_server()):
    """uvicorn's server whose first SIGTERM / SIGINT drains instead of closing the socket at once.

    Draining: every new request gets 503 (the socket still answers, so clients learn why), the engine
    stops accepting and answers every request it accepted, then uvicorn shuts down.  The signal is not
    re-raised afterwards (uvicorn's default), so the process exits 0.  A second SIGINT forces exit.
    """

    def __init__(self, config, app):
        super().__init__(config)
        self.app_ = app
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self._draining = True
        self.app_.state.serve_state["draining"] = True
        loop = self._loop
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        log.info("draining: new requests get 503; answering %d accepted user(s)",
                 self.app_.state.engine.queue_depth + self.app_.state.engine.active)
        await asyncio.get_running_loop().run_in_executor(None, self.app_.state.engine.close)
        state = self.app_.state.serve_state
        while state["inflight"] > 0:          # handlers writing their answers
            await asyncio.sleep(0.01)
        self.should_exit = True

    async def serve(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)
