"""`modrm serve` as a real process on a free port, called over HTTP: OpenRLHF's protocol, concurrency, every
bad request, bearer tokens, SIGTERM with requests in flight, and verl's adapter."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import RewardModel, cli
from pipeline.checkpoint import heads_version
from pipeline.connections import check_max_connections
from pipeline.errors import ModrmError
from pipeline.evaluate import evaluate
from pipeline.integrations import verl
from pipeline.serve import ServeConfig
from pipeline.synth import generate_pairs

pytestmark = pytest.mark.slow  # training runs, subprocesses or many examples: `make test-fast` skips them

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"
MODULES = ["reflection", "planner", "executor", "memory"]
PROMPT = "<|im_start|>user\nDebug a memory leak<|im_end|>\n<|im_start|>assistant\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.url, self.log = process, f"http://127.0.0.1:{port}", log

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        raw: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 600,
    ):
        """(status, parsed JSON, headers) of one call; errors come back as values, not exceptions. `headers`
        replace the JSON content type and the bearer token."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or sent)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read()), response.headers
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body), err.headers
            except ValueError:  # uvicorn's own answers (a request cancelled at shutdown) are plain text
                return err.code, body.decode(), err.headers

    def post(self, path: str, body: object, **kwargs):
        return self.request("POST", path, body, **kwargs)


@contextmanager
def running(checkpoint: Path, *flags: str, env: dict | None = None, open_files: int | None = None) -> Iterator[Server]:
    """A `modrm serve` process, once healthy; `open_files`: its soft open-file limit."""
    port = free_port()
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    command = [sys.executable, "-m", "pipeline", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]

    def limit_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "--device", "cpu", *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | (env or {}),
            preexec_fn=limit_files,
        )
    server = Server(process, port, log)
    try:
        deadline = time.time() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if server.request("GET", "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline:
                raise AssertionError(f"server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(stage0: Path) -> Iterator[Server]:
    limits = ["--max-items", "16", "--max-body-mb", "0.25", "--max-queue", "64", "--batch-wait-ms", "20"]
    with running(stage0, *limits, "--weights", "planner=2,executor=1,reflection=1,memory=1") as s:
        yield s


@pytest.fixture(scope="module")
def rm(stage0: Path) -> RewardModel:
    return RewardModel.load(stage0, device="cpu")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return json.loads(SEED_PAIRS.read_text())


WEIGHTS = {"planner": 2.0, "executor": 1.0, "reflection": 1.0, "memory": 1.0}


def test_get_reward_speaks_openrlhf_and_equals_the_python_api_and_eval(server, rm, records, stage0, tmp_path):
    sides = [r["positive"]["trajectory_full_context"] for r in records[:8]]
    prompts = [PROMPT + r["task"] for r in records[:8]]
    body = {"query": [p + t for p, t in zip(prompts, sides, strict=True)], "prompts": prompts, "labels": [None] * 8}
    status, answer, _ = server.post("/get_reward", body)
    assert status == 200 and set(answer) == {"rewards", "scores", "extra_logs", "head_version"}
    items = [{"task": p, "trajectory": t} for p, t in zip(prompts, sides, strict=True)]
    assert answer["rewards"] == pytest.approx(rm.reward(items, WEIGHTS), abs=1e-5)
    assert answer["scores"] == pytest.approx([1 / (1 + math.exp(-r)) for r in answer["rewards"]])
    scores = rm.score(items)
    for module in MODULES:
        assert answer["extra_logs"][module] == pytest.approx([s[module] for s in scores], abs=1e-5)

    # /score with the tasks as the pairs have them: the target module's reward is eval's r_pos
    pair_items = [{"task": r["task"], "trajectory": s} for r, s in zip(records, sides, strict=False)]
    status, scored, _ = server.post("/score", {"items": pair_items})
    evaluate([stage0], SEED_PAIRS, tmp_path, split="all", progress=False)
    r_pos = {s["pair_id"]: s["r_pos"] for s in map(json.loads, (tmp_path / "scores.jsonl").read_text().splitlines())}
    for record, rewards in zip(records, scored["rewards"], strict=False):
        assert rewards[record["target_module"]] == pytest.approx(r_pos[record["pair_id"]], abs=2e-3)

    # a query that does not start with its prompt is all trajectory; the prompt is still the task
    status, answer, _ = server.post("/get_reward", {"query": [sides[0]], "prompts": [prompts[0]]})
    assert answer["rewards"] == pytest.approx(rm.reward(items[:1], WEIGHTS), abs=1e-5)
    assert server.post("/get_reward", {"query": [], "prompts": [], "labels": []})[1] == {
        "rewards": [],
        "scores": [],
        "extra_logs": {m: [] for m in MODULES} | {f"{m}_mask": [] for m in MODULES},
        "head_version": heads_version(stage0),
    }
    assert server.post("/score", {"items": []})[1] == {"rewards": [], "head_version": heads_version(stage0)}


def test_a_trajectory_without_module_text_gets_the_empty_reward(server):
    status, answer, _ = server.post("/get_reward", {"query": ["plain text, no tags"]})
    assert status == 200 and answer["rewards"] == [0.0] and answer["extra_logs"]["planner"] == [None]
    assert answer["extra_logs"]["planner_mask"] == [0.0]


def test_32_concurrent_openrlhf_clients_get_what_sequential_calls_get(server, records):
    """OpenRLHF's pattern: one sample per POST, many POSTs at once; the server batches them."""
    bodies = [
        {"query": [PROMPT + r[side]["trajectory_full_context"]], "prompts": [PROMPT], "labels": [""]}
        for r in records
        for side in ("positive", "negative")
    ][:32]
    sequential = [server.post("/get_reward", b)[1]["rewards"][0] for b in bodies]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(lambda b: server.post("/get_reward", b), bodies))
    assert all(status == 200 for status, _, _ in concurrent)
    assert [answer["rewards"][0] for _, answer, _ in concurrent] == pytest.approx(sequential, abs=1e-5)
    batches = [line for line in server.log.read_text().splitlines() if "batch: " in line]
    assert any(int(line.split("batch: ")[1].split()[0]) > 1 for line in batches)  # requests shared a model call
    assert all("trajectories" in line and "tokens" in line and " ms" in line for line in batches)


def huge(n: int) -> str:
    return "x" * n


@pytest.mark.parametrize(
    ("path", "body", "status", "pattern"),
    [
        ("/get_reward", b"{not json", 400, "not valid JSON"),
        ("/get_reward", b"[1, 2]", 400, "expected a JSON object"),
        ("/get_reward", {"prompts": ["a"]}, 400, "'query': expected a list of strings, got NoneType"),
        ("/get_reward", {"query": "abc"}, 400, "'query': expected a list of strings, got str"),
        ("/get_reward", {"query": ["a", 3]}, 400, r"'query'\[1\]: expected a string, got int"),
        ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, 400, "'prompts' has 1 entries but 'query' has 2"),
        ("/get_reward", {"query": ["a"], "labels": [1, 2]}, 400, "'labels' has 2 entries"),
        ("/get_reward", {"query": ["a"], "weights": {"critic": 1}}, 400, "unknown module.*critic"),
        ("/get_reward", {"query": ["a"], "weights": [1]}, 400, "'weights': expected an object"),
        ("/get_reward", {"query": ["a"] * 17}, 413, "17 trajectories, more than the limit of 16"),
        ("/get_reward", {"query": [huge(300_000)]}, 413, "over the limit of 262144"),
        ("/score", {"items": [{"task": "t"}]}, 400, r"item 0, field 'trajectory'"),
        ("/score", {"items": "x"}, 400, "expected"),
        ("/nope", {}, 404, "POST /nope: Not Found"),
        ("/score", {"items": [{"task": "t", "trajectory": "\ud800"}]}, 400, r"field 'trajectory': not valid Uni"),
        ("/get_reward", {"query": ["a", "\udfff"]}, 400, r"'query'\[1\]: not valid Unicode"),
        pytest.param("/get_reward", b"[" * 100_000 + b"]" * 100_000, 400, "nests too deeply", id="deep"),
        ("/get_reward", {"query": ["a"], "weights": {"planner": 10**400}}, 400, "planner=10{39}.*finite number"),
        ("/get_reward", {"query": ["a"], "weights": dict.fromkeys(MODULES, 1e308)}, 400, "sum overflows"),
    ],
)
def test_every_bad_request_is_a_4xx_with_one_line_and_the_server_keeps_serving(server, path, body, status, pattern):
    raw = body if isinstance(body, bytes) else None
    got, answer, _ = server.post(path, None if raw else body, raw=raw)
    assert got == status and set(answer) == {"error"}
    assert "\n" not in answer["error"] and re.search(pattern, answer["error"]), answer
    assert server.post("/get_reward", {"query": ["<plan>x</plan>"]})[0] == 200


def test_health_and_info(server):
    assert server.request("GET", "/health")[:2] == (200, {"status": "ok"})
    status, info, _ = server.request("GET", "/info")
    assert status == 200 and info["modules"] == MODULES and info["stage"] == 0
    assert info["device"] == "cpu" and info["compiled"] is False  # compiling is for GPUs unless asked
    assert info["weights"] == WEIGHTS and info["limits"]["max_items"] == 16 and info["encoder"]["fingerprint"]
    assert info["checkpoint"] == "stage0"  # its folder's name, not where it lies on the host
    assert server.request("GET", "/get_reward")[0] == 405
    assert server.request("GET", "/openapi.json")[0] == 404 and server.request("GET", "/docs")[0] == 404


def post_as(server: Server, content_type: str | None) -> int:
    """The status of a valid /get_reward sent with this Content-Type (None: no such header at all)."""
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=600)
    headers = {"Content-Type": content_type} if content_type else {}
    connection.request("POST", "/get_reward", json.dumps({"query": ["<plan>x</plan>"]}).encode(), headers)
    status = connection.getresponse().status
    connection.close()
    return status


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("Application/JSON; charset=utf-8", 200),
        ("application/x-www-form-urlencoded", 415),  # an HTML form's, and curl -d's
        ("text/plain", 415),  # what a page's fetch may send without asking the server first
        (None, 415),
    ],
)
def test_only_json_bodies_are_taken(server, content_type, status):
    assert post_as(server, content_type) == status


def test_one_bad_request_among_concurrent_ones_fails_alone(server, records):
    """A lone surrogate (valid JSON, not UTF-8) posted with five good requests: the five get their rewards."""
    good = [{"query": [PROMPT + r["positive"]["trajectory_full_context"]], "prompts": [PROMPT]} for r in records[:5]]
    bad = {"query": [PROMPT + "<plan>\ud800</plan>"], "prompts": [PROMPT]}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda body: server.post("/get_reward", body), [*good[:3], bad, *good[3:]]))
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 200, 200, 400, 200, 200], answers
    assert re.search(r"'query'\[0\]: not valid Unicode", answers[3][1]["error"])


@pytest.mark.parametrize(
    ("flag", "value", "pattern"),
    [
        ("empty_reward", math.nan, "--empty-reward nan: must be a finite number"),
        ("max_body_mb", math.inf, "--max-body-mb inf: must be a finite number"),
        ("batch_wait_ms", math.nan, "--batch-wait-ms nan"),
        ("shutdown_timeout", math.inf, "--shutdown-timeout inf"),
        ("request_timeout", math.nan, "--request-timeout nan"),
        ("max_connections", 2**64, "--max-connections 18446744073709551616: the open-file limit of .* leaves"),
    ],
)
def test_serve_refuses_impossible_settings_at_start(flag, value, pattern):
    with pytest.raises(ModrmError, match=pattern):
        cli.serve_cmd(Path("checkpoint"), **{flag: value})


@pytest.mark.parametrize("soft", [512, 1024, 1 << 20])
def test_the_default_connection_limit_stays_below_the_open_file_limit(monkeypatch, soft):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, resource.RLIM_INFINITY))
    default = ServeConfig().max_connections
    assert 1 <= default <= min(1000, soft - 256)  # room for the server's own files and a burst of accepts
    check_max_connections(default)
    with pytest.raises(ModrmError, match=f"the open-file limit of {soft} leaves room for {soft - 256}"):
        check_max_connections(soft)


@pytest.mark.parametrize(
    ("cuda", "flag", "compiled"),
    [(True, None, True), (True, False, False), (False, None, False), (False, True, True)],
)
def test_serve_compiles_by_default_only_on_a_gpu(monkeypatch, cuda, flag, compiled):
    """`modrm serve` compiles where it pays (a GPU: 2-3x the trajectories/s) unless --no-compile; on a CPU only with
    --compile. The load is stopped once asked: what matters is what it was asked."""
    asked = {}

    def load(checkpoint, device, cache_size, compile, trust_remote_code):
        asked["compile"] = compile
        raise SystemExit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(RewardModel, "load", load)
    with pytest.raises(SystemExit):
        cli.serve_cmd(Path("checkpoint"), compile=flag)
    assert asked == {"compile": compiled}


def test_verl_compute_score_calls_the_server(server, rm, records, monkeypatch):
    monkeypatch.setenv("MODRM_URL", server.url)
    trajectory = records[0]["positive"]["trajectory_full_context"]
    result = verl.compute_score("agent", trajectory, None, {"task": records[0]["task"]})
    [scores] = rm.score([{"task": records[0]["task"], "trajectory": trajectory}])
    assert result["score"] == pytest.approx(
        rm.reward([{"task": records[0]["task"], "trajectory": trajectory}], WEIGHTS)[0], abs=1e-5
    )
    assert {k: result[k] for k in MODULES} == pytest.approx(scores, abs=1e-5)
    partial = verl.compute_score("agent", "<plan>only a plan</plan>", None)
    assert set(partial) == {"score", *MODULES, *(f"{m}_mask" for m in MODULES)} and math.isnan(partial["memory"])
    assert partial["memory_mask"] == 0.0 and partial["planner_mask"] == 1.0
    monkeypatch.delenv("MODRM_URL")
    with pytest.raises(RuntimeError, match="MODRM_URL"):
        verl.compute_score("agent", trajectory, None)


def distinct_trajectories(pairs_per_module: int) -> list[dict]:
    """8 distinct trajectories per pair per module, a second or more of work each on a CPU (the seed pairs share
    most of theirs)."""
    pairs = generate_pairs(pairs_per_module, seed=3)
    return [{"task": p.task, "trajectory": side.context} for p in pairs for side in (p.positive, p.negative)]


def test_bearer_token_full_queue_and_sigterm_with_requests_in_flight(stage0):
    """While the model scores request A, B waits in the queue and C would overflow it (503); then SIGTERM: A and B
    still get their rewards, and a batch finishes after the server has begun shutting down."""
    sides = distinct_trajectories(16)
    flags = ["--api-key-env", "MODRM_TEST_KEY", "--max-items", "128", "--max-queue", "150", "--cache-size", "0"]
    flags += ["--shutdown-timeout", "600", "--request-timeout", "600"]  # A and B finish however loaded the machine is
    with running(stage0, *flags, env={"MODRM_TEST_KEY": "s3cret"}) as server:
        body = {"items": sides[:1]}
        status, answer, headers = server.post("/score", body)
        assert status == 401 and answer == {"error": "missing or wrong bearer token (Authorization: Bearer <key>)"}
        assert headers["WWW-Authenticate"] == "Bearer"
        assert server.post("/score", body, token="wrong")[0] == 401
        assert server.request("GET", "/info")[0] == 401
        assert server.request("GET", "/health")[0] == 200  # probes need no token
        assert server.post("/score", body, token="s3cret")[0] == 200
        lower = {"Content-Type": "application/json", "Authorization": "bearer s3cret"}
        assert server.post("/score", body, headers=lower)[0] == 200  # the scheme is case-insensitive (RFC 7235)
        assert server.request("GET", "/openapi.json", token="s3cret")[0] == 404  # no schema to hand out

        pool = ThreadPoolExecutor(2)
        a = pool.submit(server.post, "/score", {"items": sides}, token="s3cret")  # 128 trajectories: seconds of work
        time.sleep(0.3)
        b = pool.submit(server.post, "/score", {"items": sides[::-1]}, token="s3cret")  # queued behind A
        time.sleep(0.3)
        status, answer, headers = server.post("/score", {"items": sides}, token="s3cret")
        assert status == 503 and headers["Retry-After"] == "1" and "busy" in answer["error"]
        assert not a.done() and not b.done()
        server.process.send_signal(signal.SIGTERM)
        assert a.result()[0] == 200 and b.result()[0] == 200
        values = [[list(r.values()) for r in f.result()[1]["rewards"]] for f in (a, b)]
        np.testing.assert_allclose(values[0], values[1][::-1], atol=1e-5)
        # uvicorn re-raises the signal once it has shut down gracefully, so the exit status is SIGTERM's
        assert server.process.wait(timeout=60) == -signal.SIGTERM
        log = server.log.read_text()
        assert "batch: 1 requests, 128 trajectories" in log[log.index("Shutting down") :]
        assert "Application shutdown complete" in log


def test_shutdown_timeout_answers_what_still_runs_with_json_and_exits_though_the_model_is_busy(stage0):
    """--shutdown-timeout 2 while the model scores a request of minutes: the request is answered 503 in JSON, and
    the process exits within the timeout and a margin (the model thread, a daemon, is not waited for)."""
    sides = distinct_trajectories(128)  # 1024 trajectories
    with running(stage0, "--max-items", "1024", "--cache-size", "0", "--shutdown-timeout", "2") as server:
        a = ThreadPoolExecutor(1).submit(server.post, "/score", {"items": sides})
        time.sleep(1.0)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=300) == -signal.SIGTERM
        exited = time.monotonic() - started
        status, answer, headers = a.result()
        assert status == 503 and "shutting down" in answer["error"] and headers["Retry-After"] == "1"
        log = server.log.read_text()
        assert "timeout graceful shutdown exceeded" in log and "Traceback" not in log
        assert exited < 2 + 20, log[-3000:]


def test_slow_clients_cannot_lock_others_out_nor_flood_the_log(stage0):
    """Under an open-file limit of 512, 600 connections that send part of a request's headers and stall: a new
    client still gets its reward, every stalled connection is closed (--header-timeout 1, or to make room), and
    the log says so at most once a second, without a traceback."""
    with running(stage0, "--header-timeout", "1", open_files=512) as server:
        port, started = int(server.url.rsplit(":", 1)[1]), time.monotonic()
        stalled = []
        for _ in range(12):  # in bursts the listen backlog takes
            for _ in range(50):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                stalled.append(sock)
            time.sleep(0.05)
        for sock in stalled:
            with contextlib.suppress(OSError):
                sock.send(b"POST /score HTTP/1.1\r\nHost: x\r\n")
        status, answer, _ = server.request("POST", "/get_reward", {"query": ["<plan>x</plan>"]}, timeout=60)
        assert status == 200 and len(answer["rewards"]) == 1
        assert not still_open(stalled, timeout=60)
        for sock in stalled:
            sock.close()
        log = server.log.read_text()
        refusals = [line for line in log.splitlines() if "connections at the limit" in line or "accept()" in line]
        assert "Traceback" not in log and len(refusals) <= time.monotonic() - started + 1, log[-3000:]


def still_open(sockets: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets the other side has not closed within `timeout` seconds."""
    poller, left = select.poll(), {sock.fileno(): sock for sock in sockets}
    for fd in left:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for fd, _ in poller.poll(1000):
            with contextlib.suppress(OSError):
                if left[fd].recv(1):
                    continue  # the server answered something: still open
            poller.unregister(fd)
            del left[fd]
    return list(left.values())
