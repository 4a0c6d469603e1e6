"""The trajectory parser: exact seed views, and tolerance of the malformed text real agents produce."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline.data import DEFAULT_MODULES
from pipeline.errors import ModrmError
from pipeline.trajectory import MODULE_TAGS, SEPARATOR, module_view, module_views, parse_trajectory

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEED_PAIRS = json.loads((FIXTURES / "seed_training_pairs.json").read_text(encoding="utf-8"))
SEED_FLAT = json.loads((FIXTURES / "seed_synthetic_dataset.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("side", ["positive", "negative"])
@pytest.mark.parametrize("pair", SEED_PAIRS, ids=[p["pair_id"] for p in SEED_PAIRS])
def test_module_view_reproduces_seed_pairs(pair: dict, side: str) -> None:
    record = pair[side]
    trajectory = parse_trajectory(record["trajectory_full_context"])
    assert trajectory.warnings == []
    assert module_view(trajectory, pair["target_module"]) == record["module_k_all_rounds"]


def test_module_view_reproduces_seed_flat_records() -> None:
    assert len(SEED_FLAT) == 64
    for record in SEED_FLAT:
        assert module_view(record["trajectory_full_context"], record["target_module"]) == record["module_k_all_rounds"]


def test_module_views_gives_every_default_module() -> None:
    context = SEED_PAIRS[0]["positive"]["trajectory_full_context"]
    views = module_views(context)
    assert list(views) == list(DEFAULT_MODULES)
    assert all(views[m] == module_view(context, m) for m in DEFAULT_MODULES)
    assert views["executor"].startswith("Action: Round 1: Using tool: code_analyzer")


ROUND_TWO_NO_STORE = """Round 1:
<memory query>
q1
</memory query>
<memory result>
r1
</memory result>
<memory store>
s1
</memory store>

Round 2:
<memory query>
q2
</memory query>
<memory result>
r2
</memory result>
"""


def test_missing_tags_are_just_absent() -> None:
    trajectory = parse_trajectory(ROUND_TWO_NO_STORE)
    assert trajectory.warnings == []
    assert [r.number for r in trajectory.rounds] == [1, 2]
    assert module_view(trajectory, "memory") == "Query: q1 | Result: r1 | Store: s1 | Query: q2 | Result: r2"
    assert module_view(trajectory, "planner") == ""
    assert module_view("<action>\nrun it\n</action>", "executor") == "Action: run it"


def test_unclosed_tag_stops_at_the_next_tag_and_warns() -> None:
    text = "Round 1:\n<plan>\np1\n</plan>\nRound 2:\n<plan>\np2 step\n<action>\na2\n</action>\n"
    trajectory = parse_trajectory(text)
    assert module_view(trajectory, "planner") == "p1 | p2 step"
    assert module_view(trajectory, "executor") == "Action: a2"
    assert len(trajectory.warnings) == 1
    assert "round 2" in trajectory.warnings[0] and "<plan>" in trajectory.warnings[0]


def test_unclosed_tag_stops_at_a_round_line_or_the_end() -> None:
    trajectory = parse_trajectory("Round 1:\n<reflection>\nr1\nRound 2:\n<reflection>\nr2")
    assert module_view(trajectory, "reflection") == "r1 | r2"
    assert [r.number for r in trajectory.rounds] == [1, 2]
    assert "round 1: <reflection>" in trajectory.warnings[0] and "'Round N:' line" in trajectory.warnings[0]
    assert "round 2: <reflection>" in trajectory.warnings[1] and "end" in trajectory.warnings[1]


def test_unclosed_tag_cut_by_a_container_close() -> None:
    trajectory = parse_trajectory("Round 3:\n<think>\n<reflection>\nr\n</think>\n<plan>\np\n</plan>\n")
    assert module_view(trajectory, "reflection") == "r"
    assert module_view(trajectory, "planner") == "p"
    assert trajectory.warnings == ["round 3: <reflection> is not closed; took its text up to </think>"]


def test_stray_closing_tag_is_ignored_with_a_warning() -> None:
    trajectory = parse_trajectory("Round 1:\n</plan>\n<plan>\np\n</plan>\n")
    assert module_view(trajectory, "planner") == "p"
    assert trajectory.warnings == ["round 1: </plan> has no opening <plan>; ignored it"]


def test_text_without_round_lines_is_one_round() -> None:
    trajectory = parse_trajectory("<plan>\na\n</plan>\n<action>\nx\n</action>\n<tool results>\nok\n</tool results>")
    assert len(trajectory.rounds) == 1 and trajectory.rounds[0].number is None
    assert trajectory.warnings == []
    assert module_view(trajectory, "executor") == "Action: x | Result: ok"


def test_tags_before_the_first_round_line_are_kept_with_a_warning() -> None:
    trajectory = parse_trajectory("<plan>\np0\n</plan>\nRound 1:\n<plan>\np1\n</plan>\n")
    assert module_view(trajectory, "planner") == "p0 | p1"
    assert "before the first 'Round N:' line" in trajectory.warnings[0]


def test_empty_and_tagless_text() -> None:
    empty = parse_trajectory("")
    assert empty.rounds == [] and empty.warnings == []
    assert module_views("") == dict.fromkeys(DEFAULT_MODULES, "")
    prose = parse_trajectory("just some prose, Round 1: with no tags")
    assert prose.rounds == [] and "no known tags" in prose.warnings[0]


def test_round_text_inside_content_is_not_a_round_line() -> None:
    trajectory = parse_trajectory("Round 1:\n<plan>\nRound 1: keep this prefix\n</plan>\n")
    assert [r.number for r in trajectory.rounds] == [1]
    assert module_view(trajectory, "planner") == "Round 1: keep this prefix"


def test_repeated_tags_keep_document_order_and_empty_tags_are_absent() -> None:
    text = "Round 1:\n<action>a</action><tool results>r</tool results><action>b</action><tool results></tool results>"
    assert module_view(text, "executor") == "Action: a | Result: r | Action: b"


def test_tag_case_blanks_crlf_and_angle_brackets_in_content() -> None:
    text = "Round 1:\r\n<Tool  Results>\r\nList<int> ok\r\n</tool results>\r\nRound 2:\r\n<PLAN>p</plan>"
    trajectory = parse_trajectory(text)
    assert trajectory.warnings == []
    assert module_view(trajectory, "executor") == "Result: List<int> ok"
    assert module_view(trajectory, "planner") == "p"


def test_new_modules_are_one_mapping_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODULE_TAGS, "critic", {"critique": "Critique: "})
    text = "Round 1:\n<critique>\nweak\n</critique>\nRound 2:\n<critique>\nbetter\n</critique>\n"
    assert module_view(text, "critic") == "Critique: weak | Critique: better"


def test_unknown_module_and_non_text_raise_modrm_error() -> None:
    with pytest.raises(ModrmError, match="'critic'"):
        module_view("Round 1:\n<plan>p</plan>", "critic")
    with pytest.raises(ModrmError, match="must be a string"):
        parse_trajectory(None)  # type: ignore[arg-type]


def test_arbitrary_strings_never_crash() -> None:
    rng = random.Random(0)
    pieces = ["<plan>", "</plan>", "<think>", "</think>", "<memory query>", "</tool results>", "Round 2:", "Round ",
              "\n", "\r\n", " ", "<", ">", "/", "x", "9" * 30, "<Action>", "é", "\x00"]  # fmt: skip
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        trajectory = parse_trajectory(text)
        for view in module_views(trajectory).values():  # empty tags are absent: a view has no empty piece
            assert view == "" or all(piece.strip() for piece in view.split(SEPARATOR)), (text, view)
