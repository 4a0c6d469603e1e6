"""`modrm serve`: a checkpoint's rewards over HTTP for RL loops, in OpenRLHF's remote reward protocol and more.

    POST /get_reward  {"query": [str], "prompts": [str], "labels": [...]}  (OpenRLHF's --reward.remote_url)
                  ->  {"rewards": [float], "scores": [float in 0..1], "extra_logs": {"<module>": [float|null]}}
    POST /score       {"items": [{"task": str, "trajectory": str}]}  ->  {"rewards": [{"<module>": float|null}]}
    GET  /health      200 once the model is loaded
    GET  /info        modules, stage, encoder, device, compiled, version, limits

One model per process. A request is read and checked on the event loop, then queued; a micro-batcher gathers
the requests that arrive within `batch_wait_ms` (up to `max_batch` trajectories) into one `RewardModel.score`
call in a single model thread, so concurrent clients share forward passes and the event loop never waits on the
model. Every user error is a 4xx with {"error": "<one line>"}; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pipeline import __version__
from pipeline.errors import ModrmError
from pipeline.reward import RewardModel, check_items, weighted_mean

log = logging.getLogger("modrm.serve")


@dataclass(frozen=True)
class ServeConfig:
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_batch: int = 256  # trajectories per model call (1: no micro-batching)
    max_queue: int = 4096  # trajectories waiting for the model; beyond it, 503 with Retry-After
    max_items: int = 1024  # trajectories per request
    max_body_bytes: int = 16 << 20
    weights: dict[str, float] | None = None  # module weights of the reward (None: equal)
    empty_reward: float = 0.0  # /get_reward's reward for a trajectory with no text for any weighted module
    api_key: str | None = field(default=None, repr=False)  # bearer token; None: no authentication
    shutdown_timeout_s: float = 60.0  # on SIGTERM, how long requests in flight may take to finish

    def limits(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("api_key", "weights")}


class ApiError(Exception):
    """A request the server refuses: its status, one line, and any headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


# ---------------------------------------------------------------------------------------------- micro-batching


@dataclass
class Pending:
    items: list[dict]
    future: asyncio.Future


class MicroBatcher:
    """Gathers concurrent requests into one model call, run by a single worker thread."""

    def __init__(self, rm: RewardModel, config: ServeConfig):
        self.rm, self.config = rm, config
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.waiting = 0  # trajectories queued, not yet taken into a batch
        self.last_batch_requests = 0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modrm-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.worker.shutdown(wait=True)

    async def submit(self, items: list[dict]) -> list[dict[str, float | None]]:
        if self.waiting + len(items) > self.config.max_queue:
            raise ApiError(
                503,
                f"busy: {self.waiting} trajectories already wait for the model (limit {self.config.max_queue}); retry",
                {"Retry-After": "1"},
            )
        pending = Pending(items, asyncio.get_running_loop().create_future())
        self.waiting += len(items)
        self.queue.put_nowait(pending)
        return await pending.future

    async def _gather(self, first: Pending) -> tuple[list[Pending], Pending | None]:
        """The first request and whatever is queued or arrives within batch_wait_ms, up to max_batch
        trajectories; a request that would overflow the batch is carried to the next one (a request is never
        split). The wait is spent only when the last batch had company: a lone client pays no latency for it."""
        batch, size = [first], len(first.items)
        wait = self.config.batch_wait_ms / 1e3 if self.last_batch_requests > 1 else 0.0
        deadline = time.perf_counter() + wait
        while size < self.config.max_batch:
            left = deadline - time.perf_counter()
            try:
                nxt = self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if size + len(nxt.items) > self.config.max_batch:
                return batch, nxt
            batch.append(nxt)
            size += len(nxt.items)
        return batch, None

    async def _run(self) -> None:
        loop, carried = asyncio.get_running_loop(), None
        while True:
            batch, carried = await self._gather(carried or await self.queue.get())
            self.last_batch_requests = len(batch)
            items = [item for pending in batch for item in pending.items]
            self.waiting -= len(items)
            before, start = replace(self.rm.stats), time.perf_counter()
            try:
                scores = await loop.run_in_executor(self.worker, self.rm.score, items)
            except Exception as err:  # the model failed (out of memory, say): every request of the batch hears it
                log.exception("batch of %d trajectories failed", len(items))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(err)
                continue
            after = self.rm.stats
            log.info(
                "batch: %d requests, %d trajectories, %d texts encoded (%d tokens), %d from cache, %.1f ms",
                len(batch),
                len(items),
                after.encoded - before.encoded,
                after.tokens - before.tokens,
                after.cache_hits - before.cache_hits,
                (time.perf_counter() - start) * 1e3,
            )
            offset = 0
            for pending in batch:
                if not pending.future.done():  # a client that went away leaves a cancelled future
                    pending.future.set_result(scores[offset : offset + len(pending.items)])
                offset += len(pending.items)


# ---------------------------------------------------------------------------------------------- requests


def string_list(body: dict, key: str, required: bool) -> list[str] | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list):
        raise ApiError(400, f"'{key}': expected a list of strings, got {type(value).__name__}")
    for i, entry in enumerate(value):
        if not isinstance(entry, str):
            raise ApiError(400, f"'{key}'[{i}]: expected a string, got {type(entry).__name__}")
    return value


def split_query(query: str, prompt: str | None) -> dict[str, str]:
    """OpenRLHF's query is prompt + response: the task is the prompt, the trajectory the rest (the whole query
    when it does not start with its prompt)."""
    if prompt is None:
        return {"task": "", "trajectory": query}
    return {"task": prompt, "trajectory": query[len(prompt) :] if query.startswith(prompt) else query}


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


class RewardService:
    """The endpoints' logic, apart from HTTP: checks a body, scores through the batcher, shapes the answer."""

    def __init__(self, rm: RewardModel, config: ServeConfig):
        self.rm, self.config = rm, config
        self.weights = rm.check_weights(config.weights)
        self.batcher = MicroBatcher(rm, config)

    def _check_size(self, n: int, what: str) -> None:
        if n > self.config.max_items:
            raise ApiError(413, f"'{what}': {n} trajectories, more than the limit of {self.config.max_items}")

    async def get_reward(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}")
        queries = string_list(body, "query", required=True)
        prompts = string_list(body, "prompts", required=False)
        self._check_size(len(queries), "query")
        for key, value in (("prompts", prompts), ("labels", body.get("labels"))):
            if isinstance(value, list) and len(value) != len(queries):
                raise ApiError(400, f"'{key}' has {len(value)} entries but 'query' has {len(queries)}")
        weights = self.weights
        if body.get("weights") is not None:
            if not isinstance(body["weights"], dict):
                raise ApiError(400, "'weights': expected an object of module: weight")
            try:
                weights = self.rm.check_weights(body["weights"])
            except ModrmError as err:
                raise ApiError(400, str(err)) from None
        items = [split_query(q, prompts[i] if prompts else None) for i, q in enumerate(queries)]
        scores = await self.batcher.submit(items) if items else []
        rewards = [weighted_mean(s, weights) for s in scores]
        rewards = [self.config.empty_reward if r is None else r for r in rewards]
        return {
            "rewards": rewards,
            "scores": [sigmoid(r) for r in rewards],
            "extra_logs": {m: [s[m] for s in scores] for m in self.rm.modules},
        }

    async def score(self, body: Any) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise ApiError(400, 'body: expected {"items": [{"task": str, "trajectory": str}, ...]}')
        self._check_size(len(body["items"]), "items")
        try:
            check_items(body["items"], source="'items'")
        except ModrmError as err:
            raise ApiError(400, str(err)) from None
        items = [{"task": i["task"], "trajectory": i["trajectory"]} for i in body["items"]]
        return {"rewards": await self.batcher.submit(items) if items else []}

    def info(self) -> dict:
        ckpt = self.rm.checkpoint
        return {
            "modules": self.rm.modules,
            "stage": ckpt.stage,
            "checkpoint": str(ckpt.folder),
            "encoder": {"name": ckpt.config.encoder.name, "fingerprint": ckpt.fingerprint.to_dict()},
            "device": str(next(self.rm.heads.parameters()).device),
            "compiled": self.rm.encoder.compiled,
            "weights": self.weights,
            "version": __version__,
            "limits": self.config.limits() | {"cache_size": self.rm.cache.size},
            "auth": self.config.api_key is not None,
        }


# ---------------------------------------------------------------------------------------------- HTTP


def create_app(rm: RewardModel, config: ServeConfig) -> FastAPI:
    """The FastAPI app around a loaded model (the batcher starts and stops with the app's lifespan)."""
    service = RewardService(rm, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        app.state.ready = True
        yield
        app.state.ready = False
        await service.batcher.stop()

    app = FastAPI(title="modrm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ready = False

    def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=dict(headers or {}))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error(err.status, err.message, err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, f"{request.method} {request.url.path}: {err.detail}", err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, f"internal error: {type(err).__name__}")

    async def read_json(request: Request) -> Any:
        """The body within max_body_bytes (413 beyond, before reading it where the length is declared)."""
        limit = config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"body of {int(declared)} bytes is over the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"body is over the limit of {limit} bytes")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"body is not valid JSON ({err})") from None

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        sent = request.headers.get("authorization", "")
        if not (sent.startswith("Bearer ") and hmac.compare_digest(sent[7:].encode(), config.api_key.encode())):
            raise ApiError(
                401, "missing or wrong bearer token (Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"}
            )

    def endpoint(handler: Callable) -> Callable:
        async def run(request: Request) -> JSONResponse:
            authorize(request)
            return JSONResponse(await handler(await read_json(request)))

        return run

    app.add_api_route("/get_reward", endpoint(service.get_reward), methods=["POST"])
    app.add_api_route("/score", endpoint(service.score), methods=["POST"])

    @app.get("/health")
    async def health() -> JSONResponse:
        if not app.state.ready:
            return error(503, "loading")
        return JSONResponse({"status": "ok"})

    @app.get("/info")
    async def info(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(service.info())

    return app


def parse_weights(text: str | None) -> dict[str, float] | None:
    """`planner=2,memory=0.5` -> {"planner": 2.0, "memory": 0.5}."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ModrmError(f"--weights {text!r}: expected module=weight pairs separated by commas")
    return weights


def serve(rm: RewardModel, config: ServeConfig, host: str, port: int) -> None:
    """Run until SIGINT or SIGTERM; on either, requests in flight finish (within `shutdown_timeout_s`) before the
    process exits."""
    import uvicorn

    app = create_app(rm, config)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=config.shutdown_timeout_s,  # beyond it, what still runs is cancelled (a 500)
    )
