"""`modrm serve` as a real process on a free port, called over HTTP: OpenRLHF's protocol, concurrency, every
bad request, bearer tokens, SIGTERM with requests in flight, and verl's adapter."""

from __future__ import annotations

import json
import math
import os
import re
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
from pipeline.evaluate import evaluate
from pipeline.integrations import verl
from pipeline.synth import generate_pairs

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

    def request(self, method: str, path: str, body: object = None, raw: bytes | None = None, token: str | None = None):
        """(status, parsed JSON, headers) of one call; errors come back as values, not exceptions."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
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
def running(checkpoint: Path, *flags: str, env: dict | None = None) -> Iterator[Server]:
    port = free_port()
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    command = [sys.executable, "-m", "pipeline", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "--device", "cpu", *flags], stdout=out, stderr=subprocess.STDOUT, env=os.environ | (env or {})
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
    assert status == 200 and set(answer) == {"rewards", "scores", "extra_logs"}
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
        "extra_logs": {m: [] for m in MODULES},
    }
    assert server.post("/score", {"items": []})[1] == {"rewards": []}


def test_a_trajectory_without_module_text_gets_the_empty_reward(server):
    status, answer, _ = server.post("/get_reward", {"query": ["plain text, no tags"]})
    assert status == 200 and answer["rewards"] == [0.0] and answer["extra_logs"]["planner"] == [None]


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
    assert server.request("GET", "/get_reward")[0] == 405


@pytest.mark.parametrize(
    ("cuda", "flag", "compiled"),
    [(True, None, True), (True, False, False), (False, None, False), (False, True, True)],
)
def test_serve_compiles_by_default_only_on_a_gpu(monkeypatch, cuda, flag, compiled):
    """`modrm serve` compiles where it pays (a GPU: 2-3x the trajectories/s) unless --no-compile; on a CPU only with
    --compile. The load is stopped once asked: what matters is what it was asked."""
    asked = {}

    def load(checkpoint, device, cache_size, compile):
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
    assert set(partial) == {"score", *MODULES} and math.isnan(partial["memory"])
    monkeypatch.delenv("MODRM_URL")
    with pytest.raises(RuntimeError, match="MODRM_URL"):
        verl.compute_score("agent", trajectory, None)


def distinct_trajectories() -> list[dict]:
    """512 distinct trajectories, seconds of work in one request (the seed pairs share most of theirs)."""
    pairs = generate_pairs(64, seed=3)
    return [{"task": p.task, "trajectory": side.context} for p in pairs for side in (p.positive, p.negative)]


def test_bearer_token_full_queue_and_sigterm_with_requests_in_flight(stage0):
    """While the model scores request A, B waits in the queue and C would overflow it (503); then SIGTERM: A and B
    still get their rewards, and a batch finishes after the server has begun shutting down."""
    sides = distinct_trajectories()
    flags = ["--api-key-env", "MODRM_TEST_KEY", "--max-items", "512", "--max-queue", "600", "--cache-size", "0"]
    flags += ["--shutdown-timeout", "600"]  # A and B finish however loaded the machine is (seconds when idle)
    with running(stage0, *flags, env={"MODRM_TEST_KEY": "s3cret"}) as server:
        body = {"items": sides[:1]}
        status, answer, headers = server.post("/score", body)
        assert status == 401 and answer == {"error": "missing or wrong bearer token (Authorization: Bearer <key>)"}
        assert headers["WWW-Authenticate"] == "Bearer"
        assert server.post("/score", body, token="wrong")[0] == 401
        assert server.request("GET", "/info")[0] == 401
        assert server.request("GET", "/health")[0] == 200  # probes need no token
        assert server.post("/score", body, token="s3cret")[0] == 200

        pool = ThreadPoolExecutor(2)
        a = pool.submit(server.post, "/score", {"items": sides}, token="s3cret")  # 512 trajectories: seconds of work
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
        assert "batch: 1 requests, 512 trajectories" in log[log.index("Shutting down") :]
        assert "Application shutdown complete" in log


def test_shutdown_timeout_caps_the_wait_for_requests_in_flight(stage0):
    """--shutdown-timeout: a request still running when it expires is cancelled (a 500) and the process exits."""
    sides = distinct_trajectories()
    with running(stage0, "--max-items", "512", "--cache-size", "0", "--shutdown-timeout", "0.2") as server:
        a = ThreadPoolExecutor(1).submit(server.post, "/score", {"items": sides})  # seconds of work
        time.sleep(0.3)
        started = time.time()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) is not None
        assert a.result()[0] == 500
        assert "timeout graceful shutdown exceeded" in server.log.read_text()
        assert time.time() - started < 30
