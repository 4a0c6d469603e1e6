"""The Python API for RL loops: RewardModel against eval and the heads, weights, the LRU, threads, and TRL's
reward-function signature."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline import RewardModel
from pipeline.errors import ModrmError
from pipeline.evaluate import evaluate
from pipeline.trajectory import module_views

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"
MODULES = ["reflection", "planner", "executor", "memory"]
PLAN_ONLY = "Round 1:\n<plan> Step 1: read the logs </plan>\nRound 2:\n<plan> Step 2: fix the leak </plan>"


@pytest.fixture(scope="module")
def rm(stage0: Path) -> RewardModel:
    return RewardModel.load(stage0, device="cpu")


@pytest.fixture(scope="module")
def seed_records() -> list[dict]:
    return json.loads(SEED_PAIRS.read_text())


def items_of(records: list[dict], side: str) -> list[dict]:
    return [{"task": r["task"], "trajectory": r[side]["trajectory_full_context"]} for r in records]


def test_rewards_equal_modrm_eval_on_the_same_pairs(rm, stage0, seed_records, tmp_path):
    """A pair's sides, given as raw trajectories, score as `modrm eval` scores the pair (eval reads fp16 cached
    embeddings, the API encodes in fp32: equal to that rounding)."""
    evaluate([stage0], SEED_PAIRS, tmp_path, split="all", progress=False)
    scores = {s["pair_id"]: s for s in map(json.loads, (tmp_path / "scores.jsonl").read_text().splitlines())}
    assert rm.modules == MODULES
    for side, key in (("positive", "r_pos"), ("negative", "r_neg")):
        got = rm.score(items_of(seed_records, side))
        for record, rewards in zip(seed_records, got, strict=True):
            assert set(rewards) == set(MODULES) and all(isinstance(v, float) for v in rewards.values())
            assert rewards[record["target_module"]] == pytest.approx(scores[record["pair_id"]][key], abs=2e-3)


def test_a_module_without_text_is_none_and_left_out_of_the_reward(rm):
    [scores] = rm.score([{"task": "Debug a memory leak", "trajectory": PLAN_ONLY}])
    assert scores["planner"] is not None and [m for m, v in scores.items() if v is None] == [
        "reflection",
        "executor",
        "memory",
    ]
    assert rm.reward([{"task": "Debug a memory leak", "trajectory": PLAN_ONLY}]) == [scores["planner"]]
    assert rm.reward([{"task": "t", "trajectory": "no tags at all"}]) == [None]


def test_reward_is_the_weighted_mean_of_the_modules_present(rm, seed_records):
    items = items_of(seed_records[:6], "positive")
    scores = rm.score(items)
    assert rm.reward(items) == pytest.approx([np.mean(list(s.values())) for s in scores])
    weights = {"planner": 3.0, "memory": 1.0}
    want = [(3 * s["planner"] + s["memory"]) / 4 for s in scores]
    assert rm.reward(items, weights) == pytest.approx(want)


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [
        ({"critic": 1.0}, "unknown module.*critic"),
        ({"planner": -1.0}, "planner=-1.0 must be a finite number >= 0"),
        ({"planner": float("nan")}, "planner=nan"),
        ({"planner": "2"}, "planner='2'"),
        ({"planner": 0.0}, "at least one module"),
    ],
)
def test_bad_weights_are_refused(rm, weights, pattern):
    with pytest.raises(ModrmError, match=pattern):
        rm.reward([{"task": "t", "trajectory": PLAN_ONLY}], weights)


@pytest.mark.parametrize(
    ("items", "pattern"),
    [
        ("not a list", "expected a list"),
        ([{"task": "t"}], "item 0, field 'trajectory'"),
        ([{"task": "t", "trajectory": PLAN_ONLY}, {"task": 3, "trajectory": "x"}], "item 1, field 'task'"),
        ([["t", "x"]], "item 0: expected an object"),
    ],
)
def test_bad_items_name_the_item_and_field(rm, items, pattern):
    with pytest.raises(ModrmError, match=pattern):
        rm.score(items)


def unique_texts(rm: RewardModel, items: list[dict]) -> set[str]:
    enc = rm.checkpoint.config.encoder
    contexts = {enc.context_text(i["task"], i["trajectory"]) for i in items}
    return contexts | {v for i in items for v in module_views(i["trajectory"], rm.modules).values() if v}


def test_each_unique_text_is_encoded_once_and_repeats_come_from_the_lru(stage0, seed_records, monkeypatch):
    rm = RewardModel.load(stage0, device="cpu")
    encoded: list[str] = []
    tokenize = rm.encoder.tokenize
    monkeypatch.setattr(rm.encoder, "tokenize", lambda texts, *a: encoded.extend(texts) or tokenize(texts, *a))
    group = items_of(seed_records[:3], "positive") * 4  # a GRPO group: the same trajectories again and again
    first = rm.score(group)
    assert len(encoded) == len(set(encoded)) and set(encoded) == unique_texts(rm, group)
    assert first[:3] == first[3:6] == first[9:12]
    new = items_of(seed_records[5:6], "positive")
    again = rm.score(group[:3] + new)  # one new trajectory: only its texts the first call lacked are encoded
    np.testing.assert_allclose([list(r.values()) for r in again[:3]], [list(r.values()) for r in first[:3]], atol=1e-6)
    assert set(encoded[len(unique_texts(rm, group)) :]) == unique_texts(rm, new) - unique_texts(rm, group)
    assert rm.stats.encoded == len(encoded) and rm.stats.cache_hits == rm.stats.texts - len(encoded) > 0

    small = RewardModel.load(stage0, device="cpu", cache_size=2)
    small.score(group[:3])
    small.score(group[:3])
    assert small.stats.encoded == 2 * len(unique_texts(rm, group[:3])) and len(small.cache) == 2  # evicted


def test_concurrent_calls_get_what_sequential_calls_get(stage0, seed_records):
    rm = RewardModel.load(stage0, device="cpu", cache_size=0)  # no cache: every thread runs the model
    batches = [items_of(seed_records[i::8], "negative") for i in range(8)]
    sequential = [rm.score(b) for b in batches]
    results: dict[int, list] = {}

    def call(i: int) -> None:
        results[i] = rm.score(batches[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == sequential


# ---------------------------------------------------------------------------------------------- TRL signature


def test_reward_function_has_trl_signature_and_takes_chat_messages(rm, seed_records):
    items = items_of(seed_records[:4], "positive")
    fn = rm.as_reward_function()
    assert fn.__name__ == "modrm_reward"
    prompts, completions = [i["task"] for i in items], [i["trajectory"] for i in items]
    want = rm.reward(items)
    assert fn(prompts, completions, completion_ids=[[1]] * 4, trainer_state=None) == want
    chat_prompts = [[{"role": "system", "content": p}] for p in prompts]
    chat_completions = [[{"role": "assistant", "content": [{"type": "text", "text": c}]}] for c in completions]
    assert fn(chat_prompts, chat_completions) == want
    planner = rm.as_reward_function(module="planner")
    assert planner.__name__ == "modrm_planner"
    assert planner(prompts, completions) == [s["planner"] for s in rm.score(items)]
    weighted = rm.as_reward_function(weights={"executor": 1.0})
    assert weighted(prompts, completions) == [s["executor"] for s in rm.score(items)]


def test_reward_function_refuses_what_it_cannot_score(rm):
    with pytest.raises(ModrmError, match="module 'critic'"):
        rm.as_reward_function(module="critic")
    with pytest.raises(ModrmError, match="not both"):
        rm.as_reward_function(module="planner", weights={"planner": 1.0})
    fn = rm.as_reward_function()
    with pytest.raises(ModrmError, match="2 prompts but 1 completions"):
        fn(["a", "b"], ["<plan>x</plan>"])
    with pytest.raises(ModrmError, match="completion 0: a chat message needs a string 'content'"):
        fn(["a"], [[{"role": "assistant"}]])


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on the CPU needs a C compiler")
@pytest.mark.slow
def test_compiled_encoder_scores_as_the_eager_one(rm, stage0, seed_records):
    """`compile=True` (modrm serve --compile): the model's repeated blocks compiled, and the same rewards from
    them, for a lone trajectory (compiled at load for batches of one) and for a padded batch."""
    compiled = RewardModel.load(stage0, device="cpu", compile=True)
    model = compiled.encoder.model
    blocks = {type(m).__name__ for m in model.modules() if m._compiled_call_impl is not None}
    assert blocks == set(model._no_split_modules)  # BertEmbeddings and BertLayer for MiniLM
    items = items_of(seed_records, "positive")
    for batch in (items[:1], items):
        got, want = compiled.score(batch), rm.score(batch)
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=1e-4)
