"""The server in this process (uvicorn in a thread, the tiny stage-0 model) under hostile clients, called from
threads: fuzzed hostile bodies sent with valid ones never fail them, a request that fails inside a shared model
call fails alone, a reward that overflows is refused, and slow clients are closed."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import RewardModel
from pipeline.connections import uvicorn_config
from pipeline.errors import ModrmError
from pipeline.learner import LearnConfig
from pipeline.serve import ServeConfig, create_app

pytestmark = pytest.mark.slow  # training runs, subprocesses or many examples: `make test-fast` skips them

MODULES = ["reflection", "planner", "executor", "memory"]
MAX_ITEMS = 8


class StandIn:
    """The real model, but `score` replaced by `score(model, items)`."""

    def __init__(self, rm: RewardModel, score: Callable):
        self.rm, self._score = rm, score

    def __getattr__(self, name: str):
        return getattr(self.rm, name)

    def score(self, items: list[dict]) -> list[dict]:
        return self._score(self.rm, items)


@contextmanager
def serving(rm: RewardModel | StandIn, learn: LearnConfig | None = None, **settings) -> Iterator[tuple[str, FastAPI]]:
    """(base URL, app) of a server on a free port, run by uvicorn in a thread as `modrm serve` runs it."""
    config = ServeConfig(**settings)
    app = create_app(rm, config, learn)
    server = uvicorn.Server(uvicorn_config(app, config, "127.0.0.1", 0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(60)


def post(url: str, body: object, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url, content=data, headers={"Content-Type": content_type}, timeout=120)
    return response.status_code, response.json()


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def rm(stage0: Path) -> RewardModel:
    return RewardModel.load(stage0, device="cpu")


# ---------------------------------------------------------------------------------------------- one bad request


@pytest.mark.parametrize(
    ("error", "status", "pattern"),
    [
        (RuntimeError("CUDA out of memory"), 500, r"model failure \(RuntimeError\)"),
        (ModrmError("item 0: a text the tokenizer cannot take"), 400, "refused this request: item 0: a text"),
    ],
)
def test_a_request_that_fails_inside_a_shared_model_call_fails_alone(rm, error, status, pattern):
    calls, gate = [], threading.Event()

    def score(model: RewardModel, items: list[dict]) -> list[dict]:
        calls.append(len(items))
        if len(calls) == 1:
            gate.wait(60)  # the model is busy: the next requests queue up into one batch
        if any("POISON" in item["trajectory"] for item in items):
            raise error
        return model.score(items)

    with serving(StandIn(rm, score)) as (url, app), ThreadPoolExecutor(7) as pool:
        first = pool.submit(post, url + "/score", {"items": [{"task": "t", "trajectory": "<plan>first</plan>"}]})
        poll(lambda: calls == [1], "the first request in the model")
        texts = ["<plan>a</plan>", "<plan>b</plan>", "<plan>POISON</plan>", "<plan>c</plan>", "d", "<plan>e</plan>"]
        rest = [pool.submit(post, url + "/score", {"items": [{"task": "t", "trajectory": t}]}) for t in texts]
        poll(lambda: app.state.service.batcher.waiting == 6, "six requests queued")
        gate.set()
        answers = [f.result() for f in [first, *rest]]
    assert calls == [1, 6, 1, 1, 1, 1, 1, 1]  # the batch of six failed, then each request was scored alone
    assert [s for s, _ in answers] == [200, 200, 200, status, 200, 200, 200]
    assert set(answers[3][1]) == {"error"} and re.search(pattern, answers[3][1]["error"])
    [alone] = rm.score([{"task": "t", "trajectory": "<plan>a</plan>"}])
    assert answers[1][1]["rewards"][0]["planner"] == pytest.approx(alone["planner"], abs=1e-5)


def test_a_reward_that_overflows_with_the_weights_is_refused(rm):
    """Module rewards of 10 and a weight of 1e308: the weighted sum overflows; the client hears why (not a 500
    from a JSON answer that cannot hold infinity)."""
    with serving(StandIn(rm, lambda model, items: [dict.fromkeys(MODULES, 10.0) for _ in items])) as (url, _):
        status, answer = post(url + "/get_reward", {"query": ["<plan>x</plan>"], "weights": {"planner": 1e308}})
        assert status == 400 and "query 0's reward is inf with these weights" in answer["error"]
        status, answer = post(url + "/get_reward", {"query": ["<plan>x</plan>"], "weights": {"planner": 1e300}})
        assert status == 200 and answer["rewards"] == [10.0]


# ---------------------------------------------------------------------------------------------- slow clients


def stall(url: str, first_bytes: bytes) -> socket.socket:
    """A connection that sends `first_bytes` and nothing more."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(first_bytes)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection within a minute (without having answered anything)."""
    sock.settimeout(60)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


HALF_HEADERS = b"POST /score HTTP/1.1\r\nHost: x\r\n"


def test_a_connection_over_the_limit_closes_the_one_waiting_longest_for_headers(rm):
    with serving(rm, max_connections=4, header_timeout_s=600) as (url, _):
        stalled = [stall(url, HALF_HEADERS) for _ in range(4)]
        time.sleep(0.1)
        assert post(url + "/get_reward", {"query": ["<plan>x</plan>"]})[0] == 200
        assert closed_by_server(stalled[0])
        stalled[1].settimeout(0.2)
        with pytest.raises(TimeoutError):
            stalled[1].recv(1)  # the others still wait: the header timeout is long


def test_a_client_trickling_its_headers_is_closed_after_the_header_timeout(rm):
    with serving(rm, header_timeout_s=0.5) as (url, _):
        sock = stall(url, b"POST /score HTTP/1.1\r\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a byte every 0.1 s does not restart the clock
            try:
                sock.sendall(b"X")
            except OSError:
                break
            time.sleep(0.1)
        assert closed_by_server(sock)


def test_a_body_that_stalls_is_answered_408_after_the_request_timeout(rm):
    with serving(rm, request_timeout_s=0.5) as (url, _):
        headers = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        sock = stall(url, headers + b'{"items": ')
        answer = b"".join(iter(lambda: sock.recv(4096), b"")).decode()  # up to the close the 408 announces
        assert answer.startswith("HTTP/1.1 408") and '"error":"body not received within 0.5 s"' in answer


# ---------------------------------------------------------------------------------------------- fuzzing

texts = st.text(max_size=40)
tagged = st.builds(lambda a, b: f"Round 1:\n<plan>{a}</plan>\n<reflection>{b}</reflection>", texts, texts)
trajectories = st.one_of(texts, tagged)


@st.composite
def valid_bodies(draw) -> tuple[str, object]:
    n = draw(st.integers(1, 3))
    path = draw(st.sampled_from(["/score", "/get_reward", "/slime", "/classify"]))
    if path == "/score":
        items = [{"task": draw(texts), "trajectory": draw(trajectories)} for _ in range(n)]
        return "/score", {"items": items}
    if path == "/slime":
        return "/slime", {"prompt": draw(texts), "response": draw(trajectories), "label": None}
    if path == "/classify":
        return "/classify", {"model": "m", "input": [draw(trajectories) for _ in range(n)], "use_activation": False}
    queries = [draw(trajectories) for _ in range(n)]
    body = {"query": queries, "prompts": [""] * n, "labels": [None] * n}
    if draw(st.booleans()):
        body["weights"] = {draw(st.sampled_from(MODULES)): draw(st.floats(0.5, 1e6))}
    return "/get_reward", body


def poisoned(body: dict, value: object) -> dict:
    """The body with its first text replaced by `value`."""
    body = json.loads(json.dumps(body))
    if "items" in body:
        body["items"][0]["trajectory"] = value
    elif "response" in body:
        body["response"] = value
    else:
        body["query" if "query" in body else "input"][0] = value
    return body


LISTS = {"/score": "items", "/get_reward": "query", "/classify": "input"}  # each endpoint's list of trajectories


def answered(path: str, body: dict, answer: dict) -> tuple[int, int]:
    """How many trajectories the answer scores, and what the body sent, read as each caller reads it."""
    if path == "/slime":
        return int(isinstance(answer["reward"], float)), 1
    got = answer["data"] if path == "/classify" else answer["rewards"]
    return len(got), len(body[LISTS[path]])


surrogates = st.integers(0xD800, 0xDFFF).map(chr)
not_texts = st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=3), st.just({}))
bad_weights = st.one_of(
    st.integers(min_value=10**309, max_value=10**400),
    st.floats(max_value=-1e-9),
    st.just(math.nan),
    st.just(math.inf),
    st.text(max_size=5),
    st.booleans(),
)


@st.composite
def hostile_bodies(draw) -> tuple[str, object, str]:
    """(path, body, content type) of a request the server must refuse with a 4xx."""
    path, body = draw(valid_bodies())
    kind = draw(st.sampled_from(["surrogate", "type", "weights", "overflow", "nesting", "bytes", "size", "ctype"]))
    if kind == "surrogate":
        text = draw(texts)
        at = draw(st.integers(0, len(text)))
        return path, poisoned(body, text[:at] + draw(surrogates) + text[at:]), "application/json"
    if kind == "type":
        return path, poisoned(body, draw(not_texts)), "application/json"
    if kind == "weights":
        weights = {"planner": draw(bad_weights)}
        return "/get_reward", {"query": ["<plan>x</plan>"], "weights": weights}, "application/json"
    if kind == "overflow":
        return "/get_reward", {"query": ["x"], "weights": dict.fromkeys(MODULES, 1e308)}, "application/json"
    if kind == "nesting":
        depth = draw(st.integers(2_000, 100_000))
        return path, b'{"query": ' + b"[" * depth + b"]" * depth + b"}", "application/json"
    if kind == "bytes":
        return path, draw(st.binary(max_size=64)), "application/json"
    if kind == "size":
        path, body = (path, body) if path in LISTS else ("/get_reward", {"query": ["x"]})
        return path, {LISTS[path]: [body[LISTS[path]][0]] * (MAX_ITEMS + 1)}, "application/json"
    return path, body, draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]))


class BatchSizes(logging.Handler):
    """The number of requests in each model call, from the batcher's log lines."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("batch: "):
            self.sizes.append(record.args[0])


def test_hostile_bodies_sent_with_valid_ones_are_refused_alone(rm):
    """Valid requests always 200, hostile ones always 4xx, never a 500; requests share model calls meanwhile."""
    batches = BatchSizes()
    logging.getLogger("modrm.serve").addHandler(batches)
    logging.getLogger("modrm.serve").setLevel(logging.INFO)
    with serving(rm, max_items=MAX_ITEMS) as (url, _), ThreadPoolExecutor(8) as pool:

        @settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(valid_bodies(), min_size=2, max_size=4), st.lists(hostile_bodies(), min_size=1, max_size=3))
        def check(valid: list[tuple[str, object]], hostile: list[tuple[str, object, str]]) -> None:
            good = [pool.submit(post, url + path, body) for path, body in valid]
            bad = [pool.submit(post, url + path, body, ctype) for path, body, ctype in hostile]
            for (path, body), future in zip(valid, good, strict=True):
                status, answer = future.result()
                assert status == 200, (path, body, answer)
                got, sent = answered(path, body, answer)
                assert got == sent, (path, body, answer)
            for (path, body, ctype), future in zip(hostile, bad, strict=True):
                status, answer = future.result()
                assert 400 <= status < 500 and set(answer) == {"error"}, (path, str(body)[:200], ctype, answer)

        try:
            check()
        finally:
            logging.getLogger("modrm.serve").removeHandler(batches)
    assert max(batches.sizes) > 1  # concurrent requests shared model calls
