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
    GET  /metrics     Prometheus text format: requests, errors, latency, batches, queue, texts, module rewards,
                      the heads' version and refreshes
    GET  /versions    the heads' versions: the checkpoint's, and with --learn those learned (pipeline.learner)
    POST /reload      --checkpoint again from disk (as SIGHUP does)
    POST /pairs, /rollouts, /rollback   with --learn only (pipeline.learner)

Every protocol carries each module's reward by name (null where the trajectory has no text for it) and a mask,
`<module>_mask`: 1.0 where the module had text, 0.0 where it had none, so a loop never reads a silent 0; and
`head_version`, the heads that scored it (one version per batch: a swap happens in the model thread between two).

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
import itertools
import json
import logging
import math
import queue
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from pipeline import __version__
from pipeline.api_error import ApiError
from pipeline.checkpoint import heads_version
from pipeline.connections import default_max_connections, limit_refusal_logs, uvicorn_config
from pipeline.errors import ModrmError
from pipeline.learner import LearnConfig, Learner, Served, mine_rollouts_body, read_pairs_body
from pipeline.mine import MineOptions
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


SCORING, LEARNING = 0, 1  # model-thread priorities: a scoring batch runs before the learner's next chunk


class ModelThread:
    """One daemon thread running the model's calls, scoring calls before the learner's (each call whole: a call
    cannot be interrupted, so the learner works in small chunks). As a daemon, a call still running when the server
    has shut down does not keep the process alive (its requests were answered)."""

    def __init__(self):
        self.jobs: queue.PriorityQueue = queue.PriorityQueue()
        self.order = itertools.count()  # first come, first served within a priority
        threading.Thread(target=self._work, name="modrm-model", daemon=True).start()

    def _work(self) -> None:
        while (job := self.jobs.get()[2]) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # handed to the caller, whatever it is
                    future.set_exception(err)

    def submit(self, fn: Callable, *args: Any, priority: int = SCORING) -> concurrent.futures.Future:
        """`fn(*args)` in the model thread, for a caller in any thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((priority, next(self.order), (future, fn, args)))
        return future

    def run(self, fn: Callable, *args: Any) -> asyncio.Future:
        return asyncio.wrap_future(self.submit(fn, *args))

    def stop(self) -> None:
        self.jobs.put((SCORING, next(self.order), None))


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

    def __init__(self, rm: RewardModel, config: ServeConfig, metrics: ServeMetrics | None = None, version: str = ""):
        self.rm, self.config = rm, config
        self.version = version  # of the heads `rm` scores with; changed only in the model thread, between batches
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

    def swap(self, rm: RewardModel, version: str) -> concurrent.futures.Future:
        """Serve `rm` as `version` from the next batch on: a batch is scored by one version, never a mix."""
        return self.worker.submit(self._install, rm, version)

    def _install(self, rm: RewardModel, version: str) -> None:
        self.rm, self.version = rm, version

    def _versioned_score(self, items: list[dict]) -> tuple[str, list[dict[str, float | None]]]:
        return self.version, self.rm.score(items)

    async def submit(self, items: list[dict]) -> list[dict[str, float | None]]:
        return (await self.submit_versioned(items))[1]

    async def submit_versioned(self, items: list[dict]) -> tuple[str, list[dict[str, float | None]]]:
        """The module rewards of `items` and the version of the heads that scored them."""
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
            version, scores = await self.worker.run(self._versioned_score, items)
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
            settle(pending, result=(version, scores[offset : offset + len(pending.items)]))
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

    def __init__(self, rm: RewardModel, config: ServeConfig, learn: LearnConfig | None = None):
        self.config = config
        self.weights = rm.check_weights(config.weights)
        self.metrics = ServeMetrics()
        self.stats = RewardStats(rm.modules)
        self.base = rm.checkpoint.folder
        self.base_name = heads_version(self.base)
        self.served = Served(self.base_name, self.base, rm)
        self.swap_lock = threading.Lock()
        self.learner = None if learn is None else self._learner(learn)
        if self.learner is not None and (name := self.learner.start_version()) is not None:
            folder = self.learner.versions.known[name].folder
            self.served = Served(name, folder, rm.swapped_to(folder))  # a restart serves what was served
        self.batcher = MicroBatcher(self.served.rm, config, self.metrics, self.served.name)
        self.metrics.queue_depth.set_function(lambda: self.batcher.waiting)
        self.metrics.heads.info({"version": self.served.name})
        log.info("serving heads %s (%s)", self.served.name, self.served.folder)

    def _learner(self, learn: LearnConfig) -> Learner:
        return Learner(
            learn,
            self.base,
            serving=lambda: self.served,
            encode=lambda fn, *args: self.batcher.worker.submit(fn, *args, priority=LEARNING).result(),
            install=self.install,
            counted=lambda result: self.metrics.refreshes.labels(result).inc(),
        )

    @property
    def rm(self) -> RewardModel:
        """The model served now (a reload or a refresh swaps it between batches)."""
        return self.batcher.rm

    # ------------------------------------------------------------------------------------------ versions

    def install(self, folder: Path, name: str) -> None:
        """Serve `folder`'s checkpoint as version `name` from the next batch on (blocks: never on the event loop)."""
        with self.swap_lock:
            rm = self.batcher.rm.swapped_to(folder)
            self.batcher.swap(rm, name).result()
            self.served = Served(name, folder, rm)
            self.metrics.heads.info({"version": name})
            if self.learner is not None:
                self.learner.versions.mark_served(name)
        log.info("serving heads %s (%s)", name, folder)

    def reload(self) -> str:
        """--checkpoint again, from disk (a run that wrote into the same folder since): its version's name."""
        name = heads_version(self.base)
        self.install(self.base, name)
        self.base_name = name
        return name

    def reload_logged(self) -> None:
        """SIGHUP's reload: the result goes to the log (no client to answer)."""
        try:
            log.info("SIGHUP: reloaded %s as %s", self.base, self.reload())
        except ModrmError as err:
            log.error("SIGHUP: reload refused, the served heads stay: %s", err)

    def _learning(self, what: str) -> Learner:
        if self.learner is None:
            raise ApiError(404, f"{what}: online learning is off; start `modrm serve` with --learn STATE_DIR to use it")
        return self.learner

    async def pairs(self, body: bytes, params: Mapping[str, str]) -> dict:
        learner = self._learning("POST /pairs")

        def keep() -> int:
            return learner.receive(read_pairs_body(body, self.rm.modules, "POST /pairs"), "POST /pairs")

        return {"accepted": await in_thread(keep), "pending": learner.pending_pairs()}

    async def rollouts(self, body: bytes, params: Mapping[str, str]) -> dict:
        learner = self._learning("POST /rollouts")
        strategy = params.get("strategy", MineOptions().strategy)

        def keep() -> tuple[int, list[str]]:
            mined, summary = mine_rollouts_body(body, self.rm.modules, strategy, "POST /rollouts")
            return learner.receive(mined, "POST /rollouts", numbered=True) if mined else 0, summary

        accepted, summary = await in_thread(keep)
        return {"accepted": accepted, "mined": summary, "pending": learner.pending_pairs()}

    async def rollback(self, body: Any) -> dict:
        learner = self._learning("POST /rollback")
        if not isinstance(body, dict) or not isinstance(body.get("version"), str):
            raise ApiError(400, 'body: expected {"version": "<a name GET /versions lists>"}')
        name = body["version"]
        folder = await in_thread(lambda: learner.rollback(name, self.base_name))
        await in_thread(lambda: self.install(folder, name), status=409)
        return {"head_version": name}

    async def reload_request(self, body: Any) -> dict:
        return {"head_version": await in_thread(self.reload, status=409)}

    def versions(self) -> dict:
        if self.learner is None:
            listed, pending = [{"version": self.base_name, "status": "base", "served": True}], 0
        else:
            listed, pending = self.learner.listing(self.base_name), self.learner.pending_pairs()
        return {"served": self.served.name, "pending_pairs": pending, "versions": listed}

    # ------------------------------------------------------------------------------------------ scoring

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

    async def _scores(self, items: list[dict]) -> tuple[str, list[dict[str, float | None]]]:
        """The heads' version and the module rewards of `items` through the batcher, counted in /stats and
        /metrics."""
        version, scores = await self.batcher.submit_versioned(items) if items else (self.batcher.version, [])
        self.stats.add(scores)
        for rewards in scores:
            for module, reward in rewards.items():
                if reward is not None:
                    self.metrics.module_reward.labels(module).observe(reward)
        return version, scores

    async def _rewards(
        self, items: list[dict], weights: dict[str, float], what: str
    ) -> tuple[str, list[dict[str, float | None]], list[float]]:
        """The heads' version, module rewards and the weighted reward of each item (`empty_reward` where no
        weighted module has text); `what` names an item in the refusal of a reward that overflows."""
        version, scores = await self._scores(items)
        rewards = [weighted_mean(s, weights) for s in scores]
        rewards = [self.config.empty_reward if r is None else r for r in rewards]
        for i, reward in enumerate(rewards):
            if not math.isfinite(reward):
                raise ApiError(400, f"'weights': {what} {i}'s reward is {reward} with these weights; use smaller ones")
        return version, scores, rewards

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
        version, scores, rewards = await self._rewards(items, self._weights(body), "query")
        fields = [module_fields(s) for s in scores]
        return {
            "rewards": rewards,
            "scores": [sigmoid(r) for r in rewards],
            "extra_logs": {key: [f[key] for f in fields] for key in module_fields(dict.fromkeys(self.rm.modules))},
            "head_version": version,
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
        version, [scores], [reward] = await self._rewards([item], self._weights(body), "response")
        return {"reward": reward, **module_fields(scores), "head_version": version}

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
        version, scores, rewards = await self._rewards([split_chat(t) for t in texts], self._weights(body), "input")
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
            "head_version": version,
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
        version, scores = await self._scores(items)
        return {"rewards": scores, "head_version": version}

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
            "head_version": self.served.name,
            "learning": self.learner is not None,
        }


async def in_thread(work: Callable[[], Any], status: int = 400) -> Any:
    """`work()` in a worker thread (it reads files or loads a model); a ModrmError is the client's `status`."""
    try:
        return await asyncio.to_thread(work)
    except ModrmError as err:
        raise ApiError(status, str(err)) from None


# ---------------------------------------------------------------------------------------------- HTTP


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=dict(headers or {}))


JSON_LINES = ("application/x-ndjson", "application/jsonl")  # what /pairs and /rollouts also take


def check_content_type(request: Request, accepted: tuple[str, ...] = ("application/json",)) -> None:
    """JSON only, parameters allowed (`application/json; charset=utf-8`). A missing type is refused too: a
    browser's cross-site form posts cannot send this one, and every JSON client (`requests.post(json=...)`,
    `curl --json`) sends it."""
    sent = request.headers.get("content-type", "")
    if sent.partition(";")[0].strip().lower() not in accepted:
        raise ApiError(415, f"Content-Type {sent or '(none)'}: send {' or '.join(accepted)}")


def bearer_token(header: str) -> str | None:
    """The token of `Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = header.partition(" ")
    return token.strip(" ") if scheme.lower() == "bearer" else None


def create_app(rm: RewardModel, config: ServeConfig, learn: LearnConfig | None = None) -> FastAPI:
    """The FastAPI app around a loaded model (the batcher and the learner start and stop with the app's lifespan)."""
    service = RewardService(rm, config, learn)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        if service.learner is not None:
            service.learner.start()
        app.state.ready = True
        yield
        app.state.ready = False
        if service.learner is not None:
            service.learner.stop()
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

    async def read_body(request: Request) -> bytes:
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
        return bytes(body)

    async def read_json(request: Request) -> Any:
        body = await read_body(request)
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

    async def answer(request: Request, handler: Callable, raw: bool) -> dict:
        """The handler's answer within request_timeout_s: 408 if the body was still arriving, 503 if the
        request still waited for the model. `raw`: the handler takes the body's bytes and the query parameters."""
        deadline = asyncio.get_running_loop().time() + config.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                body = await read_body(request) if raw else await read_json(request)
        except TimeoutError:
            raise ApiError(
                408, f"body not received within {config.request_timeout_s:g} s", {"Connection": "close"}
            ) from None
        try:
            async with asyncio.timeout_at(deadline):
                return await (handler(body, request.query_params) if raw else handler(body))
        except TimeoutError:
            raise ApiError(
                503,
                f"no answer within the request timeout of {config.request_timeout_s:g} s; retry",
                {"Retry-After": "1"},
            ) from None

    def endpoint(path: str, handler: Callable, raw: bool = False, status: int = 200) -> Callable:
        async def run(request: Request) -> JSONResponse:
            with service.metrics.timed(path):
                authorize(request)
                check_content_type(request, ("application/json", *JSON_LINES) if raw else ("application/json",))
                try:
                    return JSONResponse(await answer(request, handler, raw), status_code=status)
                except asyncio.CancelledError:  # the server stops and its graceful period is over
                    return error(503, "the server is shutting down; retry elsewhere or later", {"Retry-After": "1"})

        return run

    for path, handler in (
        ("/get_reward", service.get_reward),
        ("/score", service.score),
        ("/slime", service.slime),
        ("/classify", service.classify),
        ("/rollback", service.rollback),
        ("/reload", service.reload_request),
    ):
        app.add_api_route(path, endpoint(path, handler), methods=["POST"])
    for path, handler in (("/pairs", service.pairs), ("/rollouts", service.rollouts)):
        app.add_api_route(path, endpoint(path, handler, raw=True, status=202), methods=["POST"])

    @app.get("/health")
    async def health() -> JSONResponse:
        if not app.state.ready:
            return error(503, "loading")
        return JSONResponse({"status": "ok"})

    @app.get("/info")
    async def info(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(service.info())

    @app.get("/versions")
    async def versions(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(service.versions())

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


def serve(rm: RewardModel, config: ServeConfig, host: str, port: int, learn: LearnConfig | None = None) -> None:
    """Run until SIGINT or SIGTERM; on either, requests in flight finish (within `shutdown_timeout_s`; those still
    running then are answered 503) before the process exits, without waiting for a model call still running.
    SIGHUP reloads --checkpoint from disk (as POST /reload does)."""
    app = create_app(rm, config, learn)
    settings = uvicorn_config(app, config, host, port)  # configures logging
    limit_refusal_logs()
    service = app.state.service
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=service.reload_logged, daemon=True).start())
    with suppress(KeyboardInterrupt):  # uvicorn re-raises SIGINT once it has shut down
        uvicorn.Server(settings).run()
