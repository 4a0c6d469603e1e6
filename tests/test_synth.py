"""The synthetic pair generator: determinism, one-module differences, parser agreement, file round trips."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline.data import DEFAULT_MODULES, load_pairs
from pipeline.errors import ModrmError
from pipeline.synth import generate_pairs, write_pairs
from pipeline.trajectory import module_view, module_views, parse_trajectory

ROUND_LINE = re.compile(r"^Round (\d+):$", re.MULTILINE)


@pytest.fixture(scope="module")
def pairs() -> list:
    return generate_pairs(60, seed=3)


def test_same_seed_same_pairs_other_seed_other_pairs() -> None:
    assert generate_pairs(5, seed=11) == generate_pairs(5, seed=11)
    assert generate_pairs(5, seed=11) != generate_pairs(5, seed=12)


def test_a_module_does_not_depend_on_the_others_or_the_count() -> None:
    planner_only = generate_pairs(4, seed=5, modules=["planner"])
    assert planner_only == [p for p in generate_pairs(6, seed=5) if p.target_module == "planner"][:4]


def test_ids_modules_outcomes(pairs: list) -> None:
    assert len(pairs) == 60 * len(DEFAULT_MODULES)
    for module in DEFAULT_MODULES:
        ids = [p.pair_id for p in pairs if p.target_module == module]
        assert ids == [f"{module}_{i}" for i in range(60)]
    assert {(p.positive.outcome, p.negative.outcome) for p in pairs} == {(1.0, 0.0)}


def test_module_text_is_the_parsers_view_of_the_context(pairs: list) -> None:
    for pair in pairs:
        for side in (pair.positive, pair.negative):
            trajectory = parse_trajectory(side.context)
            assert trajectory.warnings == []
            assert module_view(trajectory, pair.target_module) == side.module_text
            assert side.module_text.strip()


def test_sides_differ_only_in_the_target_module(pairs: list) -> None:
    for pair in pairs:
        positive, negative = module_views(pair.positive.context), module_views(pair.negative.context)
        assert positive[pair.target_module] != negative[pair.target_module]
        assert {m: v for m, v in positive.items() if m != pair.target_module} == {
            m: v for m, v in negative.items() if m != pair.target_module
        }
        assert ROUND_LINE.findall(pair.positive.context) == ROUND_LINE.findall(pair.negative.context)


def test_varied_tasks_rounds_and_negatives(pairs: list) -> None:
    assert len({p.task for p in pairs}) > 150
    rounds = {len(ROUND_LINE.findall(p.positive.context)) for p in pairs}
    assert rounds == set(range(1, 7))
    by_module = defaultdict(list)
    for pair in pairs:
        by_module[pair.target_module].append(pair)
    for module, module_pairs in by_module.items():
        negatives = {p.negative.module_text for p in module_pairs}
        assert len(negatives) > 40, module
        # quality, not length: some negatives are at least as long as their positives
        assert any(len(p.negative.module_text) >= len(p.positive.module_text) for p in module_pairs), module
    assert any("Looks fine. No issues." in p.negative.module_text for p in by_module["reflection"])


def test_small_counts() -> None:
    assert generate_pairs(0, seed=0) == []
    one = generate_pairs(1, seed=0)
    assert [p.pair_id for p in one] == [f"{m}_0" for m in DEFAULT_MODULES]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_write_then_load_round_trip(tmp_path: Path, suffix: str) -> None:
    pairs = generate_pairs(3, seed=1)
    path = write_pairs(tmp_path / "sub" / f"pairs{suffix}", pairs)
    assert load_pairs([path]) == pairs
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    first = path.read_text(encoding="utf-8").lstrip()[0]
    assert first == ("[" if suffix == ".json" else "{")


def test_bad_arguments_raise_modrm_error() -> None:
    with pytest.raises(ModrmError, match="only for modules reflection, planner, executor, memory; got critic"):
        generate_pairs(1, seed=0, modules=["planner", "critic"])
    with pytest.raises(ModrmError, match="twice"):
        generate_pairs(1, seed=0, modules=["planner", "planner"])
    with pytest.raises(ModrmError, match=">= 0"):
        generate_pairs(-1, seed=0)


def test_held_out_wording_reaches_only_the_test_split():
    import re

    from pipeline.config import DataConfig
    from pipeline.data import assign_split
    from pipeline.synth import _HELDOUT_WORDING, generate_pairs

    split = DataConfig()
    plain, reworded = generate_pairs(40, 3), generate_pairs(40, 3, heldout_split=split)

    def where(p) -> str:
        return assign_split(p.split_key, split.train_fraction, split.val_fraction, split.split_seed)

    words = re.compile(r"\b(" + "|".join(map(re.escape, set(_HELDOUT_WORDING.values()))) + r")\b")
    for before, after in zip(plain, reworded, strict=True):
        sides = (after.positive.context, after.negative.context, after.positive.module_text)
        assert after.pair_id == before.pair_id and after.task == before.task  # the same draws, otherwise
        if where(after) == "test":
            assert all(words.search(text) for text in sides)
            assert after.positive.module_text != after.negative.module_text
            assert after.positive.module_text == module_view(after.positive.context, after.target_module)
        else:  # train and val never take a list's last variant: the prose plan style ("Finally, ...") is one
            assert not any(words.search(text) for text in sides) and "Finally, " not in after.positive.context
    assert sum(where(p) == "test" for p in reworded) > 5
    assert any("Finally, " in p.positive.context for p in plain)


def test_off_task_test_negatives_are_another_tasks_text_and_nothing_else_changes():
    """`--off-task-test`: every test negative is the target module's text written for another task (it carries
    another goal's symptom, cause, fix or check); train and val pairs, and every positive, are what they were."""
    from pipeline.config import DataConfig
    from pipeline.data import assign_split
    from pipeline.synth import _GOALS, generate_pairs, heldout_wording

    split = DataConfig()
    usual = generate_pairs(40, 3, heldout_split=split)
    off_task = generate_pairs(40, 3, heldout_split=split, off_task_test=True)

    def foreign(pair) -> bool:
        own = next(g for g in _GOALS if pair.task.startswith(g[0].split("{")[0]))
        return any(heldout_wording(f) in pair.negative.module_text for g in _GOALS if g is not own for f in g[4:8])

    tested = []
    for before, after in zip(usual, off_task, strict=True):
        if assign_split(after.split_key, split.train_fraction, split.val_fraction, split.split_seed) != "test":
            assert after == before
            continue
        assert after.positive == before.positive and foreign(after)
        tested.append(foreign(before))
    assert len(tested) > 5 and not all(tested)  # without the option, some test negatives are of other kinds
    with pytest.raises(ModrmError, match="held-out split"):
        generate_pairs(4, 3, off_task_test=True)


def test_max_rounds_caps_the_rounds_and_leaves_the_default_draws_alone():
    assert generate_pairs(20, 3, max_rounds=6) == generate_pairs(20, 3)
    for cap in (1, 2):
        pairs = generate_pairs(40, 3, max_rounds=cap)
        rounds = {len(ROUND_LINE.findall(side.context)) for p in pairs for side in (p.positive, p.negative)}
        assert rounds == set(range(1, cap + 1)), cap
        assert all(p.positive.module_text != p.negative.module_text for p in pairs)
    for bad in (0, 7):
        with pytest.raises(ModrmError, match="max_rounds must be between 1 and 6"):
            generate_pairs(1, 0, max_rounds=bad)


def test_synth_command_takes_max_rounds_and_swapped_share(tmp_path: Path):
    """`modrm synth --max-rounds N`: every trajectory has 1 to N rounds; a cap outside 1-6, or a swapped share
    outside 0-1, is a one-line error."""
    import subprocess
    import sys

    def synth(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", "from pipeline.cli import main; main()", "synth", *args]
        return subprocess.run(command, capture_output=True, text=True)

    out = tmp_path / "pairs.jsonl"
    assert synth("--out", str(out), "--pairs-per-module", "5", "--max-rounds", "1").returncode == 0
    assert {len(ROUND_LINE.findall(p.positive.context)) for p in load_pairs([out])} == {1}
    done = synth("--out", str(tmp_path / "other.jsonl"), "--max-rounds", "7")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: synth: max_rounds must be between 1 and 6, got 7"
    ]
    done = synth("--out", str(tmp_path / "other.jsonl"), "--swapped-share", "1.5")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: synth: swapped_share must be between 0 and 1, got 1.5"
    ]


def test_swapped_negatives_hold_the_positives_words_with_two_components_exchanged():
    """`--swapped-share`: that share of pairs puts the task's component at fault on the better side and exchanges it
    with another component on the worse one, in the same words; at 0 no draw changes."""
    from pipeline.synth import _COMPONENTS

    assert generate_pairs(20, 3, swapped_share=0.0) == generate_pairs(20, 3)
    pairs = generate_pairs(40, 3, max_rounds=1, swapped_share=0.5)
    words = re.compile(r"\w+")
    swapped = [
        p
        for p in pairs
        if sorted(words.findall(p.positive.module_text)) == sorted(words.findall(p.negative.module_text))
    ]
    assert 50 < len(swapped) < 110  # about half of 160
    for pair in swapped:
        [component] = [c for c, _ in _COMPONENTS if c in pair.task]
        assert pair.positive.module_text != pair.negative.module_text
        assert pair.positive.module_text.count(component) == pair.negative.module_text.count(component) >= 1
        first = {side: side.module_text.index(component) for side in (pair.positive, pair.negative)}
        assert first[pair.positive] != first[pair.negative]  # the same words, the component in another role
    for bad in (-0.1, 1.5):
        with pytest.raises(ModrmError, match="swapped_share must be between 0 and 1"):
            generate_pairs(1, 0, swapped_share=bad)
