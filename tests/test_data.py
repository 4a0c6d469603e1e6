"""Pairs files: the three formats load alike, every problem is reported at once, splits are by task."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline.data import DEFAULT_MODULES, DataError, Problem, assign_split, check_file, load_pairs, pair_to_record


def _by_id(pairs: list) -> dict:
    return {p.pair_id: p for p in pairs}


def _records(seed_pairs_path: Path) -> list[dict]:
    return json.loads(seed_pairs_path.read_text(encoding="utf-8"))


def _side(context: str = "Round 1: <plan> a plan </plan>", module: str = "Plan: a plan", outcome=1.0) -> dict:
    return {"trajectory_full_context": context, "module_k_all_rounds": module, "outcome": outcome}


def _pair(pair_id: str, module: str = "planner", task: str = "Fix the bug", **changes: object) -> dict:
    record = {
        "pair_id": pair_id,
        "target_module": module,
        "task": task,
        "positive": _side(),
        "negative": _side("Round 1: <plan> a bad plan </plan>", "Plan: a bad plan", 0.0),
    }
    record.update(changes)
    return record


def _find(problems: list[Problem], record: str, field: str, message: str) -> Problem:
    hits = [p for p in problems if p.record == record and p.field == field and message in p.message]
    assert hits, f"no problem {record!r}/{field!r}/{message!r} among:\n" + "\n".join(map(str, problems))
    return hits[0]


# ---------------------------------------------------------------------------------------------- formats


def test_pair_and_flat_formats_give_the_same_32_pairs(seed_pairs_path: Path, seed_flat_path: Path) -> None:
    pairs = load_pairs([seed_pairs_path])
    flat = load_pairs([seed_flat_path])
    assert len(pairs) == len(flat) == 32
    assert len(_by_id(pairs)) == 32
    assert _by_id(pairs) == _by_id(flat)
    assert {p.target_module for p in pairs} == set(DEFAULT_MODULES)
    first = _by_id(pairs)["reflection_0"]
    raw = _records(seed_pairs_path)[0]
    assert first.positive.context == raw["positive"]["trajectory_full_context"]
    assert first.negative.module_text == raw["negative"]["module_k_all_rounds"]
    assert first.positive.outcome == float(raw["positive"]["outcome"])


def test_jsonl_loads_like_the_json_array(seed_pairs_path: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _records(seed_pairs_path)) + "\n", encoding="utf-8")
    assert load_pairs([jsonl]) == load_pairs([seed_pairs_path])


def test_pair_to_record_round_trips(seed_pairs_path: Path, tmp_path: Path) -> None:
    pairs = load_pairs([seed_pairs_path])
    out = tmp_path / "out.json"
    out.write_text(json.dumps([pair_to_record(p) for p in pairs]), encoding="utf-8")
    assert load_pairs([out]) == pairs


# ---------------------------------------------------------------------------------------------- validation


def _bad_jsonl(path: Path) -> Path:
    lines = [
        json.dumps(_pair("good_0")),
        '{"pair_id": "broken", "target_module": ',  # line 2: malformed JSON
        json.dumps({k: v for k, v in _pair("no_task").items() if k != "task"}),
        json.dumps(_pair("typed", task=3, positive=_side(outcome="yes"))),
        json.dumps(_pair("empty", negative=_side(module="   "))),
        json.dumps(_pair("dup")),
        json.dumps(_pair("dup", task="Another task")),
        json.dumps(_pair("same", negative=_side())),
        json.dumps(
            {
                "pair_id": "lonely",
                "target_module": "planner",
                "task": "Fix the bug",
                "is_positive": True,
                **_side(),
            }
        ),
        json.dumps(_pair("critic_0", module="critic")),
        json.dumps({k: v for k, v in _pair("x").items() if k != "pair_id"}),  # record 9 (0-based, JSON records)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_check_file_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = _bad_jsonl(tmp_path / "bad.jsonl")
    pairs, problems = check_file(path)
    assert all(p.file == str(path) for p in problems)
    assert "line 2" in str(_find(problems, "line 2", "", "malformed JSON"))
    _find(problems, "pair_id 'no_task'", "task", "missing")
    _find(problems, "pair_id 'typed'", "task", "must be a string")
    _find(problems, "pair_id 'typed'", "positive.outcome", "finite number")
    _find(problems, "pair_id 'empty'", "negative.module_k_all_rounds", "empty")
    _find(problems, "pair_id 'dup'", "pair_id", "duplicate")
    _find(problems, "pair_id 'same'", "negative", "identical")
    _find(problems, "pair_id 'lonely'", "is_positive", "without its partner")
    critic = _find(problems, "pair_id 'critic_0'", "target_module", "unknown module")
    assert "'critic'" in critic.message and "planner" in critic.message
    _find(problems, "record 9", "pair_id", "missing")
    assert len(problems) == 10, "\n".join(map(str, problems))
    assert sorted(p.pair_id for p in pairs) == ["dup", "dup", "good_0", "same"]


def test_a_custom_module_list_accepts_other_modules(tmp_path: Path) -> None:
    path = _bad_jsonl(tmp_path / "bad.jsonl")
    _, default_problems = check_file(path)
    pairs, problems = check_file(path, modules=[*DEFAULT_MODULES, "critic"])
    assert "critic_0" in {p.pair_id for p in pairs}
    assert not [p for p in problems if p.field == "target_module"]
    assert len(problems) == len(default_problems) - 1


def test_malformed_json_array_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    good = json.dumps(_pair("a"))
    path.write_text(f"[\n{good},\n{good[:-1]}\n]\n", encoding="utf-8")  # the second object is never closed
    pairs, problems = check_file(path)
    assert pairs == []
    assert len(problems) == 1
    assert problems[0].record == "line 4" and "malformed JSON" in problems[0].message
    assert str(path) in str(problems[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("[]\n", "holds no records"),
        ("[1, 2]", "must be a JSON object"),
        ('{"pair_id": "a"}\n[1]\n', "must be a JSON object"),
        ("3\n", "must be a JSON object"),
    ],
)
def test_unusable_files_are_problems_not_crashes(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text(content, encoding="utf-8")
    _, problems = check_file(path)
    assert any(message in p.message for p in problems), problems
    _, missing = check_file(tmp_path / "absent.json")
    assert missing[0].message == "no such file"


def test_flat_record_problems_name_the_side(seed_flat_path: Path, tmp_path: Path) -> None:
    records = json.loads(seed_flat_path.read_text(encoding="utf-8"))
    records[3]["outcome"] = "yes"
    records[5]["is_positive"] = "true"
    path = tmp_path / "flat.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    pairs, problems = check_file(path)
    side = "positive" if records[3]["is_positive"] else "negative"
    _find(problems, f"pair_id {records[3]['pair_id']!r}", f"{side}.outcome", "finite number")
    _find(problems, f"pair_id {records[5]['pair_id']!r}", "is_positive", "true or false")
    assert len(pairs) == 30


def test_data_error_names_file_record_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([_pair("ok"), _pair("p7", positive=_side(outcome="yes")), {"task": 1}]), "utf-8")
    with pytest.raises(DataError) as info:
        load_pairs([path])
    message = str(info.value)
    assert str(path) in message
    assert "pair_id 'p7'" in message and "positive.outcome" in message
    assert "more problems" in message
    assert any(p.record == "record 2" for p in info.value.problems)
    assert "\n" not in message
    path.write_text(json.dumps([_pair("ok"), {k: v for k, v in _pair("x").items() if k != "pair_id"}]), "utf-8")
    with pytest.raises(DataError, match=r"bad\.json: record 1, field 'pair_id': missing$"):
        load_pairs([path])


def test_pair_ids_duplicated_across_files_are_an_error(seed_pairs_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps([_records(seed_pairs_path)[4]]), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_pairs([seed_pairs_path, copy])
    problem = info.value.problems[0]
    assert problem.file == str(copy) and problem.record == "pair_id 'reflection_4'" and problem.field == "pair_id"
    assert str(seed_pairs_path) in problem.message


def test_the_same_file_given_twice_is_an_error(seed_pairs_path: Path) -> None:
    with pytest.raises(DataError):
        load_pairs([seed_pairs_path, seed_pairs_path])


# ---------------------------------------------------------------------------------------------- splits


def test_assign_split_is_deterministic_and_seeded() -> None:
    tasks = [f"task number {i}" for i in range(3000)]
    first = [assign_split(t, 0.8, 0.1) for t in tasks]
    assert first == [assign_split(t, 0.8, 0.1) for t in tasks]
    assert first == [assign_split(t, 0.8, 0.1, seed=0) for t in reversed(tasks)][::-1]
    counts = {s: first.count(s) for s in ("train", "val", "test")}
    assert 0.75 < counts["train"] / 3000 < 0.85 and 0.07 < counts["val"] / 3000 < 0.13
    assert first != [assign_split(t, 0.8, 0.1, seed=1) for t in tasks]
    assert {assign_split(t, 1.0, 0.0) for t in tasks} == {"train"}


def test_a_task_never_lands_in_two_splits(seed_pairs_path: Path) -> None:
    splits: dict[str, set[str]] = defaultdict(set)
    for pair in load_pairs([seed_pairs_path]):
        splits[pair.task].add(assign_split(pair.split_key, 0.5, 0.25))
    assert len(splits) == 16
    assert all(len(s) == 1 for s in splits.values())
    assert len(set().union(*splits.values())) >= 2  # more than one split is used, or the check proves nothing


def test_a_group_decides_the_split_and_synth_keeps_a_goals_variants_together(tmp_path: Path) -> None:
    from pipeline.synth import generate_pairs, write_pairs

    pairs = generate_pairs(60, seed=0)
    groups: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        assert (pair.group is not None and pair.group in pair.positive.context + pair.task) or pair.group
        groups[pair.group].add(assign_split(pair.split_key, 0.8, 0.1))
    assert all(len(s) == 1 for s in groups.values()) and len(groups) > 20
    # tasks that differ only in the stack share a group, so they are never split apart
    by_group: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        by_group[pair.group].add(pair.task)
    assert any(len(tasks) > 1 for tasks in by_group.values())
    again = load_pairs([write_pairs(tmp_path / "synth.jsonl", pairs)])
    assert [p.group for p in again] == [p.group for p in pairs]  # the field round-trips through a file
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(pair_to_record(pairs[0]) | {"group": 3}) + "\n")
    with pytest.raises(DataError, match="field 'group': must be a string"):
        load_pairs([bad])
