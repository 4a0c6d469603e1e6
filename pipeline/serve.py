"""`modrm serve`: a checkpoint's rewards over HTTP for RL loops, in OpenRLHF's remote reward protocol and more.

    POST /get_reward  {"query": [str], "prompts": [str], "labels": [...]}  (OpenRLHF's --reward.remote_url)
                  ->  {"rewards": [float], "scores": [float in 0..1], "extra_logs": {"<module>": [float|null]}}
    POST /score       {"items": [{"task": str, "trajectory": str}]}  ->  {"rewards": [{"<module>": float|null}]}
    POST /slime       {"prompt", "response", "label"}  (slime's --rm-type remote_rm)
                  ->  {"reward": float, "<module>": float|null, "<module>_mask": 1.0|0.0}
    POST /classify    vLLM's {"model", "input": str|[str], "use_activation"}  (verl's reward model path)
                  ->  {"data": [{"index": i, "probs": [reward], "modules": {...}}], ...}
    GET  /health      200 once the model is loaded
    GET  /info        modules, stage, encoder, device, compiled, version, limits
    GET  /stats       running count, mean and std of each module's rewards served
    GET  /metrics     Prometheus text format: requests, errors, latency, batches, queue, texts, module rewards

Every protocol carries each module's reward by name (null where the trajectory has no text for it) and a mask,
`<module>_mask`: 1.0 where the module had text, 0.0 where it had none, so a loop never reads a silent 0.

One model per process. A request is read and checked on the event loop, then queued; a micro-batcher gathers
the requests that arrive within `batch_wait_ms` (up to `max_batch` trajectories) into one `RewardModel.score`
call in a single model thread, so concurrent clients share forward passes and the event loop never waits on the
model. Every user error is a 4xx with {"error": "<one line>"}; the server keeps serving.

Hostile clients: every request is checked on its own before it joins a batch, and a batch that fails anyway is
scored again request by request, so one bad request fails alone. POSTs must say `Content-Type: application/json`
(a browser page cannot post a form to an open server). Open connections stay below the open-file limit: a
connection over `max_connections` closes the one that has waited longest for a request (a slow or idle client),
a client gets `header_timeout_s` to send a request's headers and `request_timeout_s` from them to its answer, and
the log says at most once a second that connections were refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import math
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from pipeline import __version__
from pipeline.api_error import ApiError
from pipeline.connections import default_max_connections, limit_refusal_logs, uvicorn_config
from pipeline.errors import ModrmError
from pipeline.reward import RewardModel, check_items, check_text, message_text, weighted_mean
from pipeline.serve_metrics import RewardStats, ServeMetrics

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
    header_timeout_s: float = 10.0  # a connection's time to send a request's headers, from opening or its last answer
    request_timeout_s: float = 300.0  # from a request's headers to its answer: body, queue and model
    max_connections: int = field(default_factory=default_max_connections)  # open at once; below the open-file limit

    def limits(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("api_key", "weights")}


# ---------------------------------------------------------------------------------------------- micro-batching


class ModelThread:
    """One daemon thread running the model's calls in order. A call cannot be interrupted; as a daemon, a call
    still running when the server has shut down does not keep the process alive (its requests were answered)."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="modrm-model", daemon=True).start()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # handed to the caller, whatever it is
                    future.set_exception(err)

    def run(self, fn: Callable, *args: Any) -> asyncio.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((future, fn, args))
        return asyncio.wrap_future(future)

    def stop(self) -> None:
        self.jobs.put(None)


def model_error(err: Exception) -> ApiError:
    """What a client hears when the model fails on its request alone: its own input (400), or the model (500)."""
    if isinstance(err, ModrmError | UnicodeError):
        return ApiError(400, f"the model refused this request: {err}")
    log.error("model failure on one request", exc_info=err)
    return ApiError(500, f"model failure ({type(err).__name__}); see the server log")


@dataclass
class Pending:
    items: list[dict]
    future: asyncio.Future


class MicroBatcher:
    """Gathers concurrent requests into one model call, run by a single worker thread."""

    def __init__(self, rm: RewardModel, config: ServeConfig, metrics: ServeMetrics | None = None):
        self.rm, self.config = rm, config
        self.metrics = metrics or ServeMetrics()
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.waiting = 0  # trajectories queued, not yet taken into a batch
        self.last_batch_requests = 0
        self.worker = ModelThread()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stops gathering; a model call still running is left to its thread, not waited for."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.worker.stop()

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
        carried = None
        while True:
            batch, carried = await self._gather(carried or await self.queue.get())
            self.waiting -= sum(len(pending.items) for pending in batch)
            batch = [pending for pending in batch if not pending.future.done()]  # its client timed out or left
            self.last_batch_requests = len(batch)
            if batch:
                await self._score(batch)

    async def _score(self, batch: list[Pending]) -> None:
        """One model call for the batch; should it fail, one call per request, so only a bad one fails."""
        items = [item for pending in batch for item in pending.items]
        before, start = replace(self.rm.stats), time.perf_counter()
        try:
            scores = await self.worker.run(self.rm.score, items)
        except Exception as err:
            if len(batch) == 1:
                settle(batch[0], exception=model_error(err))
                return
            log.warning("batch of %d requests failed (%s); scoring them one by one", len(batch), type(err).__name__)
            for pending in batch:
                if not pending.future.done():
                    await self._score([pending])
            return
        after = self.rm.stats
        self.metrics.batch_size.observe(len(items))
        self.metrics.encoded.inc(after.encoded - before.encoded)
        self.metrics.cached.inc(after.cache_hits - before.cache_hits)
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
            settle(pending, result=scores[offset : offset + len(pending.items)])
            offset += len(pending.items)


def settle(pending: Pending, result: Any = None, exception: Exception | None = None) -> None:
    """Answers a request unless its client has gone (a cancelled future)."""
    if pending.future.done():
        return
    if exception is not None:
        pending.future.set_exception(exception)
    else:
        pending.future.set_result(result)


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
        try:
            check_text(entry, f"'{key}'[{i}]")
        except ModrmError as err:
            raise ApiError(400, str(err)) from None
    return value


def split_query(query: str, prompt: str | None) -> dict[str, str]:
    """OpenRLHF's query is prompt + response: the task is the prompt, the trajectory the rest (the whole query
    when it does not start with its prompt)."""
    if prompt is None:
        return {"task": "", "trajectory": query}
    return {"task": prompt, "trajectory": query[len(prompt) :] if query.startswith(prompt) else query}


CHAT_TURNS = (
    re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S),  # ChatML: Qwen and many others
    re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S),  # Llama 3
)


def split_chat(text: str) -> dict[str, str]:
    """A chat-templated prompt + response (what verl sends to /classify) as task and trajectory: the task is the
    last user turn, the trajectory the assistant turns after it, joined by newlines. Text in neither template
    (ChatML, Llama 3) is all trajectory, with an empty task."""
    turns = next((found for pattern in CHAT_TURNS if (found := pattern.findall(text))), [])
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if not users:
        return {"task": "", "trajectory": text}
    task = turns[users[-1]][1]
    replies = [content for role, content in turns[users[-1] + 1 :] if role == "assistant"]
    return {"task": task.strip(), "trajectory": "\n".join(replies).strip()}


def module_fields(rewards: dict[str, float | None]) -> dict[str, float | None]:
    """A trajectory's module rewards by name (None: no text for the module) and `<module>_mask`: 1.0 where the
    module had text, 0.0 where it had none."""
    return rewards | {f"{m}_mask": float(r is not None) for m, r in rewards.items()}


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


class RewardService:
    """The endpoints' logic, apart from HTTP: checks a body, scores through the batcher, shapes the answer."""

    def __init__(self, rm: RewardModel, config: ServeConfig):
        self.rm, self.config = rm, config
        self.weights = rm.check_weights(config.weights)
        self.metrics = ServeMetrics()
        self.stats = RewardStats(rm.modules)
        self.batcher = MicroBatcher(rm, config, self.metrics)
        self.metrics.queue_depth.set_function(lambda: self.batcher.waiting)

    def _check_size(self, n: int, what: str) -> None:
        if n > self.config.max_items:
            raise ApiError(413, f"'{what}': {n} trajectories, more than the limit of {self.config.max_items}")

    def _weights(self, body: dict) -> dict[str, float]:
        if body.get("weights") is None:
            return self.weights
        if not isinstance(body["weights"], dict):
            raise ApiError(400, "'weights': expected an object of module: weight")
        try:
            return self.rm.check_weights(body["weights"])
        except ModrmError as err:
            raise ApiError(400, str(err)) from None

    async def _scores(self, items: list[dict]) -> list[dict[str, float | None]]:
        """Module rewards of `items` through the batcher, counted in /stats and /metrics."""
        scores = await self.batcher.submit(items) if items else []
        self.stats.add(scores)
        for rewards in scores:
            for module, reward in rewards.items():
                if reward is not None:
                    self.metrics.module_reward.labels(module).observe(reward)
        return scores

    async def _rewards(
        self, items: list[dict], weights: dict[str, float], what: str
    ) -> tuple[list[dict[str, float | None]], list[float]]:
        """Module rewards and the weighted reward of each item (`empty_reward` where no weighted module has
        text); `what` names an item in the refusal of a reward that overflows."""
        scores = await self._scores(items)
        rewards = [weighted_mean(s, weights) for s in scores]
        rewards = [self.config.empty_reward if r is None else r for r in rewards]
        for i, reward in enumerate(rewards):
            if not math.isfinite(reward):
                raise ApiError(400, f"'weights': {what} {i}'s reward is {reward} with these weights; use smaller ones")
        return scores, rewards

    async def get_reward(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}")
        queries = string_list(body, "query", required=True)
        prompts = string_list(body, "prompts", required=False)
        self._check_size(len(queries), "query")
        for key, value in (("prompts", prompts), ("labels", body.get("labels"))):
            if isinstance(value, list) and len(value) != len(queries):
                raise ApiError(400, f"'{key}' has {len(value)} entries but 'query' has {len(queries)}")
        items = [split_query(q, prompts[i] if prompts else None) for i, q in enumerate(queries)]
        scores, rewards = await self._rewards(items, self._weights(body), "query")
        fields = [module_fields(s) for s in scores]
        return {
            "rewards": rewards,
            "scores": [sigmoid(r) for r in rewards],
            "extra_logs": {key: [f[key] for f in fields] for key in module_fields(dict.fromkeys(self.rm.modules))},
        }

    async def slime(self, body: Any) -> dict:
        """slime's remote_rm: the prompt (a string, or chat messages) is the task, the response the trajectory."""
        if not isinstance(body, dict):
            raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}")
        if not isinstance(body.get("response"), str):
            raise ApiError(400, f"'response': expected a string, got {type(body.get('response')).__name__}")
        try:
            task = message_text(body.get("prompt") or "", "'prompt'")
            check_text(task, "'prompt'")
            check_text(body["response"], "'response'")
        except ModrmError as err:
            raise ApiError(400, str(err)) from None
        item = {"task": task, "trajectory": body["response"]}
        [scores], [reward] = await self._rewards([item], self._weights(body), "response")
        return {"reward": reward, **module_fields(scores)}

    async def classify(self, body: Any) -> dict:
        """vLLM's /classify as verl's reward-model path calls it: each input is a chat-templated prompt +
        response (split by `split_chat`); `probs` is [reward], or [sigmoid(reward)] with `use_activation`
        (vLLM's default when it is absent; verl sends false)."""
        if not isinstance(body, dict):
            raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}")
        value = body.get("input")
        texts = string_list({"input": [value] if isinstance(value, str) else value}, "input", required=True)
        self._check_size(len(texts), "input")
        activation = body.get("use_activation")
        if activation is not None and not isinstance(activation, bool):
            raise ApiError(400, f"'use_activation': expected true or false, got {type(activation).__name__}")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"'model': expected a string, got {type(model).__name__}")
        scores, rewards = await self._rewards([split_chat(t) for t in texts], self._weights(body), "input")
        probs = [[sigmoid(r)] if activation is not False else [r] for r in rewards]
        return {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model or self.rm.checkpoint.folder.name,
            "data": [
                {"index": i, "label": None, "probs": p, "num_classes": 1, "modules": module_fields(s)}
                for i, (p, s) in enumerate(zip(probs, scores, strict=True))
            ],
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
        return {"rewards": await self._scores(items)}

    def info(self) -> dict:
        ckpt = self.rm.checkpoint
        return {
            "modules": self.rm.modules,
            "stage": ckpt.stage,
            "checkpoint": ckpt.folder.name,  # not the path: it tells a caller nothing it needs about the host
            "encoder": {"name": ckpt.config.encoder.name, "fingerprint": ckpt.fingerprint.to_dict()},
            "device": str(next(self.rm.heads.parameters()).device),
            "compiled": self.rm.encoder.compiled,
            "weights": self.weights,
            "version": __version__,
            "limits": self.config.limits() | {"cache_size": self.rm.cache.size},
            "auth": self.config.api_key is not None,
        }


# ---------------------------------------------------------------------------------------------- HTTP


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=dict(headers or {}))


def check_content_type(request: Request) -> None:
    """JSON only, parameters allowed (`application/json; charset=utf-8`). A missing type is refused too: a
    browser's cross-site form posts cannot send this one, and every JSON client (`requests.post(json=...)`,
    `curl --json`) sends it."""
    sent = request.headers.get("content-type", "")
    if sent.partition(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type {sent or '(none)'}: send application/json")


def bearer_token(header: str) -> str | None:
    """The token of `Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = header.partition(" ")
    return token.strip(" ") if scheme.lower() == "bearer" else None


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

    app = FastAPI(
        title="modrm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.ready, app.state.service = False, service

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
        except RecursionError:
            raise ApiError(400, "body is not valid JSON here: it nests too deeply") from None

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        token = bearer_token(request.headers.get("authorization", ""))
        if token is None or not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise ApiError(
                401, "missing or wrong bearer token (Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"}
            )

    async def answer(request: Request, handler: Callable) -> dict:
        """The handler's answer within request_timeout_s: 408 if the body was still arriving, 503 if the
        request still waited for the model."""
        deadline = asyncio.get_running_loop().time() + config.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                body = await read_json(request)
        except TimeoutError:
            raise ApiError(
                408, f"body not received within {config.request_timeout_s:g} s", {"Connection": "close"}
            ) from None
        try:
            async with asyncio.timeout_at(deadline):
                return await handler(body)
        except TimeoutError:
            raise ApiError(
                503,
                f"no answer within the request timeout of {config.request_timeout_s:g} s; retry",
                {"Retry-After": "1"},
            ) from None

    def endpoint(path: str, handler: Callable) -> Callable:
        async def run(request: Request) -> JSONResponse:
            with service.metrics.timed(path):
                authorize(request)
                check_content_type(request)
                try:
                    return JSONResponse(await answer(request, handler))
                except asyncio.CancelledError:  # the server stops and its graceful period is over
                    return error(503, "the server is shutting down; retry elsewhere or later", {"Retry-After": "1"})

        return run

    for path, handler in (
        ("/get_reward", service.get_reward),
        ("/score", service.score),
        ("/slime", service.slime),
        ("/classify", service.classify),
    ):
        app.add_api_route(path, endpoint(path, handler), methods=["POST"])

    @app.get("/health")
    async def health() -> JSONResponse:
        if not app.state.ready:
            return error(503, "loading")
        return JSONResponse({"status": "ok"})

    @app.get("/info")
    async def info(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(service.info())

    @app.get("/stats")
    async def stats(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"modules": service.stats.summary()})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorize(request)
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

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
    """Run until SIGINT or SIGTERM; on either, requests in flight finish (within `shutdown_timeout_s`; those still
    running then are answered 503) before the process exits, without waiting for a model call still running."""
    settings = uvicorn_config(create_app(rm, config), config, host, port)  # configures logging
    limit_refusal_logs()
    with suppress(KeyboardInterrupt):  # uvicorn re-raises SIGINT once it has shut down
        uvicorn.Server(settings).run()
