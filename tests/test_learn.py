"""A reward server that learns (`modrm serve --learn`): a failure style the checkpoint cannot see is learned from
POST /pairs while a client keeps scoring, a batch of flipped labels is refused, versions roll back, what a 202
acknowledged survives kill -9, and SIGHUP reloads the checkpoint. The checkpoint: MiniLM's stage-0 heads on synth
pairs; the new failure style: the executor runs its tool on the production host instead of inside the sandbox."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from test_serve import running
from test_serve_fuzz import serving

from pipeline import RewardModel
from pipeline.cache import Cache, as_keys, text_key
from pipeline.checkpoint import HEADS_FILES, heads_version, load_checkpoint, save_heads
from pipeline.config import Config, HeadConfig
from pipeline.data import Pair, Side, pair_to_record
from pipeline.embed import embed_files
from pipeline.encoder import MINILM_ID
from pipeline.errors import ModrmError
from pipeline.learner import PAIR_ROLES, VERSION_FILE, LearnConfig, Learner, embed_pairs
from pipeline.reward import Stats
from pipeline.serve import MicroBatcher, ServeConfig, create_app
from pipeline.synth import generate_pairs, generate_rollouts, write_pairs
from pipeline.train_heads import EPOCH_LOG, train_heads
from pipeline.trajectory import module_view

pytestmark = pytest.mark.slow  # training runs, subprocesses or many examples: `make test-fast` skips them

ACTION = re.compile(r"(<action>\n)(.*?)(\n</action>)", re.S)
SANDBOX, PRODUCTION = " (run inside the sandbox)", " (run on the production host)"
DEADLINE_S = 600  # for a refresh to finish: generous, so a busy machine only makes the test slower


def executor_side(context: str, where: str, outcome: float) -> Side:
    trajectory = ACTION.sub(lambda m: m[1] + m[2] + where + m[3], context)
    return Side(trajectory, module_view(trajectory, "executor"), outcome)


def sandbox_pairs(n: int, seed: int, prefix: str) -> list[Pair]:
    """Pairs of the new style: the same executor output run inside the sandbox (better) or on production."""
    return [
        Pair(
            f"{prefix}{i}",
            "executor",
            p.task,
            executor_side(p.positive.context, SANDBOX, 1.0),
            executor_side(p.positive.context, PRODUCTION, 0.0),
            group=p.group,
        )
        for i, p in enumerate(generate_pairs(n, seed=seed, modules=["executor"], max_rounds=1))
    ]


def flipped_pairs(n: int, seed: int) -> list[Pair]:
    """Synth pairs of the kind the checkpoint learned, their labels flipped: a regression to refuse."""
    pairs = generate_pairs(n, seed=seed, max_rounds=1)
    return [replace(p, pair_id=f"flipped{i}", positive=p.negative, negative=p.positive) for i, p in enumerate(pairs)]


def jsonl(pairs: list[Pair]) -> bytes:
    return "".join(json.dumps(pair_to_record(p)) + "\n" for p in pairs).encode()


def post(url: str, body: bytes | object, **kwargs) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | kwargs.pop("headers", {})
    response = httpx.post(url, content=data, headers=headers, timeout=120, **kwargs)
    return response.status_code, response.json()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.2)


def probe_accuracy(url: str, probes: list[Pair]) -> tuple[float, str]:
    """The executor head's pairwise accuracy on `probes` as /score gives it, and the version that scored them."""
    items = [{"task": p.task, "trajectory": side.context} for p in probes for side in (p.positive, p.negative)]
    status, answer = post(url + "/score", {"items": items})
    assert status == 200
    rewards = [r["executor"] for r in answer["rewards"]]
    wins = [(a > b) + 0.5 * (a == b) for a, b in zip(rewards[::2], rewards[1::2], strict=True)]
    return float(np.mean(wins)), answer["head_version"]


def versions(url: str) -> dict:
    return httpx.get(url + "/versions", timeout=60).json()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage-0 heads (small) over synth pairs embedded with MiniLM; its cache is the replayed one."""
    root = tmp_path_factory.mktemp("learn")
    write_pairs(root / "synth.jsonl", generate_pairs(20, seed=0, max_rounds=1))
    config = Config()
    config.encoder.name, config.encoder.device, config.train.device = MINILM_ID, "cpu", "cpu"
    config.heads = HeadConfig(hidden=64, hidden2=32, dropout=0.0)
    config.encoder.max_context_tokens = 128  # the task and the end of each trajectory: half the encoding
    config.train.epochs = 20
    embed_files([root / "synth.jsonl"], root / "cache", config, progress=False)
    train_heads(root / "cache", root / "stage0", config, progress=False)
    return root / "stage0"


@pytest.fixture(scope="module")
def rm(checkpoint: Path) -> RewardModel:
    return RewardModel.load(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def learning(rm: RewardModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A learning server in this process: a refresh every 40 new pairs."""
    state = tmp_path_factory.mktemp("state")
    with serving(rm, LearnConfig(state, refresh_pairs=40, refresh_seconds=3600)) as (url, _):
        yield url


@pytest.fixture
def intake(rm: RewardModel, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A learning server that never refreshes (its URL and STATE_DIR): for what POST /pairs keeps."""
    with serving(rm, LearnConfig(tmp_path, refresh_pairs=10**9, refresh_seconds=1e9)) as (url, _):
        yield url, tmp_path


# ---------------------------------------------------------------------------------------------- learning


def test_a_new_failure_style_is_learned_while_a_client_keeps_scoring(learning, checkpoint):
    url, base = learning, heads_version(checkpoint)
    probes = sandbox_pairs(20, seed=7, prefix="probe")
    before, version = probe_accuracy(url, probes)
    assert version == base and before <= 0.6  # the checkpoint cannot tell the two apart

    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        query = {"query": [probes[0].positive.context], "prompts": [probes[0].task]}
        while not stop.is_set():
            response = httpx.post(url + "/get_reward", json=query, timeout=120)
            answers.append((response.status_code, response.json().get("head_version")))
            time.sleep(0.05)  # a policy between batches, not a spin that starves the learner of the core

    loop = threading.Thread(target=client)
    loop.start()
    try:
        status, answer = post(url + "/pairs", jsonl(sandbox_pairs(40, seed=11, prefix="new")))
        assert status == 202 and answer["accepted"] == 40
        wait_for(lambda: versions(url)["served"] == "v0001", "version v0001 served")
        wait_for(lambda: answers and answers[-1][1] == "v0001", "the client scored by v0001")
    finally:
        stop.set()
        loop.join(120)
    assert {status for status, _ in answers} == {200}  # no request failed during the refresh or the swap
    seen = [version for _, version in answers]  # every answer says its version: the base's, then v0001's
    swapped = seen.index("v0001")
    assert set(seen[:swapped]) == {base} and set(seen[swapped:]) == {"v0001"}

    after, version = probe_accuracy(url, probes)
    assert version == "v0001" and after >= 0.8
    [listed] = [v for v in versions(url)["versions"] if v["version"] == "v0001"]
    assert listed["status"] == "accepted" and listed["served"] and listed["pairs_seen"] == 40
    assert listed["val"]["original"]["accuracy"] >= listed["val"]["original"]["served_accuracy"] - 0.02
    metrics = httpx.get(url + "/metrics").text
    assert 'modrm_heads_info{version="v0001"} 1.0' in metrics
    assert 'modrm_refreshes_total{result="accepted"} 1.0' in metrics


def test_flipped_labels_are_refused_and_the_served_version_stays(learning):
    url = learning
    status, answer = post(url + "/pairs", jsonl(flipped_pairs(20, seed=3)))  # more than the 60 replayed pairs
    assert status == 202 and answer["accepted"] == 80
    wait_for(lambda: any(v["version"] == "v0002" for v in versions(url)["versions"]), "version v0002 judged")
    listed = versions(url)
    [refused] = [v for v in listed["versions"] if v["version"] == "v0002"]
    assert refused["status"] == "refused" and "worse by more than --max-regression 0.02" in refused["reason"]
    assert listed["served"] == "v0001" and not refused["served"]
    assert probe_accuracy(url, sandbox_pairs(20, seed=7, prefix="probe"))[1] == "v0001"
    assert 'modrm_refreshes_total{result="refused"} 1.0' in httpx.get(url + "/metrics").text


def test_rollback_serves_an_earlier_version_and_never_a_refused_one(learning, checkpoint):
    url, base, probes = learning, heads_version(checkpoint), sandbox_pairs(20, seed=7, prefix="probe")
    assert post(url + "/rollback", {"version": base}) == (200, {"head_version": base})
    accuracy, version = probe_accuracy(url, probes)
    assert version == base and accuracy <= 0.6 and versions(url)["served"] == base
    status, answer = post(url + "/rollback", {"version": "v0002"})
    assert status == 400 and "v0002 was refused" in answer["error"]
    status, answer = post(url + "/rollback", {"version": "v9"})
    assert status == 400 and answer["error"].startswith("'version': no version 'v9' (versions: base-")
    assert post(url + "/rollback", {"version": "v0001"}) == (200, {"head_version": "v0001"})
    accuracy, version = probe_accuracy(url, probes)
    assert version == "v0001" and accuracy >= 0.8


class Scorer:
    """A stand-in model whose first call waits to be released; answers name the model that scored."""

    def __init__(self, name: str, release: threading.Event):
        self.name, self.release, self.stats = name, release, Stats()

    def score(self, items: list[dict]) -> list[dict]:
        self.release.wait(60)
        return [{"by": self.name} for _ in items]


def test_a_swap_takes_effect_between_batches_and_a_batch_is_scored_by_one_version():
    release = threading.Event()
    old, new = Scorer("old", release), Scorer("new", release)

    async def scenario() -> list[tuple[str, list[dict]]]:
        batcher = MicroBatcher(old, ServeConfig(batch_wait_ms=0), version="v1")
        batcher.start()
        try:
            first = asyncio.create_task(batcher.submit_versioned([{}]))
            await asyncio.sleep(0.05)  # the model is busy with the first batch
            swapped = asyncio.wrap_future(batcher.swap(new, "v2"))
            rest = [asyncio.create_task(batcher.submit_versioned([{}, {}])) for _ in range(3)]  # the next batch
            await asyncio.sleep(0.05)
            release.set()
            await swapped
            return await asyncio.gather(first, *rest)
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    assert answers[0] == ("v1", [{"by": "old"}])  # the batch running when the swap came: the old heads, whole
    assert answers[1:] == [("v2", [{"by": "new"}] * 2)] * 3  # the next batch: the new heads, each item


def test_a_refresh_takes_what_the_server_just_scored_from_its_lru_and_encodes_the_rest(rm, tmp_path):
    """Rollouts come to POST /rollouts after the policy had them scored: their texts are in the server's LRU, and
    the refresh copies them to its cache instead of encoding them again."""
    pairs = sandbox_pairs(4, seed=5, prefix="lru")
    rm.score([{"task": p.task, "trajectory": side.context} for p in pairs[:2] for side in (p.positive, p.negative)])
    enc, texts = rm.checkpoint.config.encoder, {}  # key -> (role, text, context head)
    for p in pairs:
        for role, text in zip(PAIR_ROLES, enc.pair_texts(p), strict=True):
            texts[text_key(role, text)] = (role, text, enc.context_head(p.task) if role == "context" else None)
    held = {key for key in texts if key in rm.cache}
    assert 0 < len(held) < len(texts)  # the scored pairs' texts, not the others'

    encoded, from_lru = embed_pairs(pairs, tmp_path / "cache", rm, lambda fn, *args: fn(*args))
    assert (encoded, from_lru) == (len(texts) - len(held), len(held))
    cache = Cache(tmp_path / "cache", rm.checkpoint.fingerprint)
    stored = cache.embeddings()[cache.find(as_keys(b"".join(texts)))]
    for (key, (role, text, head)), row in zip(texts.items(), stored, strict=True):
        fresh = rm.encoder.encode([text], role, heads=[head] if head else None)[0]
        np.testing.assert_allclose(row.astype(np.float32), fresh, atol=2e-3)  # whichever way it came
        if key in held:
            assert np.array_equal(row, rm.cache.get(key).astype(np.float16))  # copied, not encoded again


# ---------------------------------------------------------------------------------------------- intake


def test_a_bad_record_is_refused_in_one_line_and_nothing_of_its_request_is_kept(intake):
    url, state = intake
    good = sandbox_pairs(3, seed=1, prefix="ok")
    bad = pair_to_record(sandbox_pairs(1, seed=2, prefix="bad")[0])
    del bad["task"]
    body = jsonl(good) + json.dumps(bad).encode() + b"\n"
    status, answer = post(url + "/pairs", body)
    assert (status, answer) == (400, {"error": "POST /pairs: pair_id 'bad0', field 'task': missing"})
    assert not list((state / "pairs").iterdir())

    as_list = json.dumps([pair_to_record(p) for p in good]).encode()  # a JSON list is read as well
    assert post(url + "/pairs", as_list, headers={"Content-Type": "application/x-ndjson"})[0] == 202
    status, answer = post(url + "/pairs", jsonl(good[:1]))
    assert status == 400 and "pair_id 'ok0', field 'pair_id': already received (in 000001.jsonl)" in answer["error"]
    assert [p.name for p in (state / "pairs").iterdir()] == ["000001.jsonl"]
    assert versions(url)["pending_pairs"] == 3


def test_rollouts_are_mined_by_the_strategy_the_request_names(intake):
    url, _ = intake
    rollouts = "".join(json.dumps(r) + "\n" for r in generate_rollouts(8, 8, seed=0, branched=True)).encode()
    status, answer = post(url + "/rollouts?strategy=anchor", rollouts)
    assert status == 202 and answer["accepted"] > 0 and any("anchor pairs" in line for line in answer["mined"])
    assert versions(url)["pending_pairs"] == answer["accepted"]
    assert post(url + "/rollouts?strategy=anchor", rollouts)[1]["accepted"] == answer["accepted"]  # the same ids again
    status, answer = post(url + "/rollouts", b'{"task_id": "t", "task": "x", "rollout_id": 1}\n')
    assert status == 400 and answer["error"].startswith("POST /rollouts: line 1")
    status, answer = post(url + "/rollouts?strategy=guess", rollouts)
    assert status == 400 and "--strategy 'guess'" in answer["error"]


def test_a_second_server_cannot_learn_into_the_same_state_dir(rm, intake):
    _, state = intake
    with pytest.raises(ModrmError, match="another modrm serve learns into it"):
        create_app(rm, ServeConfig(), LearnConfig(state))


def test_learning_needs_the_checkpoints_training_cache_or_replay(checkpoint, tmp_path):
    moved = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, moved)
    meta = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps(meta | {"cache": str(tmp_path / "gone")}))
    with pytest.raises(ModrmError, match=r"records no training cache that exists here .* pass --replay CACHE"):
        Learner(LearnConfig(tmp_path / "state"), moved, serving=None, encode=None, install=None)
    Learner(LearnConfig(tmp_path / "state", replay=Path(meta["cache"])), moved, serving=None, encode=None, install=None)


def test_without_learn_the_learning_endpoints_say_how_to_enable_them(rm, checkpoint):
    with serving(rm) as (url, _):
        for path in ("/pairs", "/rollouts", "/rollback"):
            status, answer = post(url + path, {"version": "v1"})
            assert status == 404 and "start `modrm serve` with --learn STATE_DIR" in answer["error"], path
        assert post(url + "/reload", {}) == (200, {"head_version": heads_version(checkpoint)})
        for path, body in (("/slime", {"prompt": "t", "response": "<plan>p</plan>"}), ("/classify", {"input": "x"})):
            assert post(url + path, body)[1]["head_version"] == heads_version(checkpoint), path


def test_reload_needs_the_bearer_token_when_one_is_set(rm):
    with serving(rm, api_key="secret") as (url, _):
        assert post(url + "/reload", {})[0] == 401
        assert post(url + "/reload", {}, headers={"Authorization": "Bearer secret"})[0] == 200


# ---------------------------------------------------------------------------------------------- a real process


def test_kill_after_202_loses_no_pairs_a_restart_serves_the_latest_version_and_sighup_reloads(checkpoint, tmp_path):
    served = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, served)
    flags = ("--learn", str(tmp_path / "state"), "--refresh-pairs", "20")
    with running(served, *flags) as server:
        status, answer, _ = server.post("/pairs", None, raw=jsonl(sandbox_pairs(20, seed=11, prefix="new")))
        assert status == 202 and answer["accepted"] == 20
        server.process.kill()  # kill -9, the refresh barely started
    with running(served, *flags) as server:  # the 20 pairs are there: they start a refresh
        wait_for(lambda: server.request("GET", "/versions")[1]["served"] == "v0001", "v0001 served after restart")
        assert server.request("GET", "/versions")[1]["versions"][-1]["pairs_seen"] == 20
        server.process.kill()
    version = tmp_path / "state" / "versions" / "v0001"  # an ordinary checkpoint, of its own files only
    assert sorted(p.name for p in version.iterdir()) == sorted([*HEADS_FILES, EPOCH_LOG, VERSION_FILE])
    item = {"task": "t", "trajectory": "<plan>p</plan>"}
    with running(served, *flags) as server:
        assert server.request("GET", "/versions")[1]["served"] == "v0001"
        answer = server.post("/score", {"items": [item]})[1]
        assert answer["head_version"] == "v0001"
        [alone] = RewardModel.load(version, device="cpu").score([item])  # what `modrm score` of the version gives
        assert answer["rewards"][0]["planner"] == pytest.approx(alone["planner"], abs=1e-5)
        retrained = load_checkpoint(served)
        with torch.no_grad():
            retrained.model.norm.bias += 0.5  # another run wrote new heads into --checkpoint
        save_heads(served, retrained.model, retrained.config, retrained.fingerprint, 0, retrained.cache, {}, [])
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: server.request("GET", "/versions")[1]["served"] == heads_version(served), "SIGHUP reload")
        assert server.post("/score", {"items": [item]})[1]["head_version"] == heads_version(served)
