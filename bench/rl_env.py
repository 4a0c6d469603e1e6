"""The toy environment of `bench_rl.py`: a multi-module agent that must pick good module outputs, built from synth's
texts, and the synth pairs its reward model is trained on.

An episode is one task. In each of its rounds every module (reflection, planner, executor, memory) picks one of
K = 3 candidate outputs written for that task and round: the good one, a subtly wrong one and a blatantly wrong
one, each in a surface style drawn at random. The outcome is 1 with a probability that falls with every wrong
pick (the curve of synth's rollouts), so success needs every module right and the outcome alone does not say
which module failed.

The subtle kinds are synth's whose fault shows in the output and the task (a skipped check, a wrong tool or file,
a timeout, a memory lookup that finds nothing, a vague or overclaiming reflection); kinds that name another
task's cause or component are left out: telling them apart needs to know which cause belongs to which task,
which a linear policy trained on a few dozen tasks cannot learn for tasks it never met (with them, even the
oracle arm stays near 0.65 on the test tasks).

Tasks are synth's goal x component groups, split three ways by a hash of the group: the reward model's training
pairs, the policy's training episodes and the test episodes never share a group. The reward model's pairs and the
training episodes use synth's training variants of every phrasing list; test episodes its held-out variant (the
last one), which neither ever saw. (Synth's held-out word swaps are not applied: a linear policy over frozen
MiniLM embeddings does not carry across them, oracle included.)

The candidates are built with synth's own phrase bank and helpers (private to pipeline.synth), so the texts are
exactly the ones the reward model's pairs are made of.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import DataConfig
from pipeline.data import Pair, assign_split
from pipeline.synth import (
    _BAD,
    _BLATANT,
    _ROUND,
    _STYLES,
    _draw_task,
    _fill,
    _good,
    _phase,
    _round_slots,
    _variant,
    generate_pairs,
)

MODULES = ("reflection", "planner", "executor", "memory")
KINDS = ("good", "subtle", "blatant")  # the K = 3 candidates of every decision
# Groups by a hash (pipeline.data.assign_split): "train" -> the reward model's pairs, "val" -> the policy's training
# episodes, "test" -> the test episodes.
SPLIT = DataConfig(train_fraction=0.5, val_fraction=0.25, split_seed=25)
ROLE_OF_SPLIT = {"train": "reward_model", "val": "policy", "test": "test"}
# P(outcome = 1 | b wrong picks) = FLOOR + SCALE * DECAY ** b: 0.95 with none, 0.28 with one, 0.09 with two...
FLOOR, SCALE, DECAY = 0.02, 0.93, 0.28


# Other tasks' content: a text with these is wrong only given which cause or component belongs to which task.
_FOREIGN = ("{wrong_cause}", "{wrong_fix}", "{other_c}")


def _shows_itself(variants: list[dict[str, str]]) -> bool:
    return not any(slot in text for variant in variants for text in variant.values() for slot in _FOREIGN)


# Per module, synth's subtle kinds whose fault shows in the output itself (a skipped check, a wrong tool, a memory
# lookup that finds nothing, a vague or overclaiming reflection...).
SUBTLE_KINDS = {m: [k for k, variants in _BAD[m].items() if k != _BLATANT and _shows_itself(variants)] for m in MODULES}


def success_probability(wrong: int | np.ndarray) -> float | np.ndarray:
    return FLOOR + SCALE * DECAY**wrong


def expected_success(p_good: np.ndarray) -> float:
    """P(outcome = 1) when decision d is right with probability p_good[d], independently: the wrong picks' count
    has a Poisson-binomial law (built one decision at a time), and each count its success probability."""
    law = np.ones(1)
    for p in p_good:
        law = np.concatenate([law * p, [0.0]]) + np.concatenate([[0.0], law * (1 - p)])
    return float(law @ success_probability(np.arange(len(law))))


@dataclass(frozen=True)
class Candidate:
    """One output a module may give in a round: its texts under synth's round keys (e.g. action and results)."""

    texts: dict[str, str]
    kind: str

    @property
    def good(self) -> bool:
        return self.kind == "good"

    @property
    def text(self) -> str:
        return "\n".join(self.texts.values())


@dataclass(frozen=True)
class Task:
    """A task and its candidates: candidates[round][module] is that decision's K candidates, in shuffled order."""

    task: str
    group: str
    candidates: tuple[tuple[tuple[Candidate, ...], ...], ...]

    @property
    def decisions(self) -> int:
        return len(self.candidates) * len(MODULES)

    def trajectory(self, picks: Sequence[int]) -> str:
        """The tagged trajectory (synth's format) of one pick per decision, decisions round by round, modules in
        MODULES order."""
        rounds = []
        for r, options in enumerate(self.candidates):
            texts: dict[str, str] = {}
            for m, choices in enumerate(options):
                texts |= choices[picks[r * len(MODULES) + m]].texts
            rounds.append(_ROUND.format(n=r + 1, **texts))
        return "\n".join(rounds)

    def good_picks(self) -> list[int]:
        return [[c.good for c in choices].index(True) for options in self.candidates for choices in options]

    def wrong(self, picks: Sequence[int]) -> np.ndarray:
        """Per decision, whether the pick was wrong."""
        flat = [choices for options in self.candidates for choices in options]
        return np.array([not choices[p].good for choices, p in zip(flat, picks, strict=True)])


def role(group: str) -> str:
    """Which part of the experiment a task group belongs to: reward_model, policy or test."""
    return ROLE_OF_SPLIT[assign_split(group, SPLIT.train_fraction, SPLIT.val_fraction, SPLIT.split_seed)]


def _candidate(module: str, kind: str, rng: random.Random, phase: str, slots: dict, wording: str) -> Candidate:
    style = rng.randrange(_STYLES)
    if kind == "good":
        return Candidate(_good(module, phase, style, slots, wording), kind)
    bad = _BLATANT if kind == "blatant" else rng.choice(SUBTLE_KINDS[module])
    return Candidate(_fill(_variant(_BAD[module][bad], style, wording), slots), kind)


def _task(rng: random.Random, task: str, slots: dict, rounds: int, wording: str) -> Task:
    candidates = []
    for r in range(1, rounds + 1):
        phase = _phase(r, rounds)
        round_slots = _round_slots(slots, phase, r, rng.randint(1, 4))
        options = []
        for module in MODULES:
            choices = [_candidate(module, kind, rng, phase, round_slots, wording) for kind in KINDS]
            rng.shuffle(choices)
            options.append(tuple(choices))
        candidates.append(tuple(options))
    return Task(task, f"{slots['goal']} in {slots['c']}", tuple(candidates))


def draw_tasks(count: int, task_role: str, seed: int, rounds: int = 1) -> list[Task]:
    """`count` distinct tasks of groups in `task_role` ("policy" or "test"), the same for the same arguments; test
    tasks in synth's held-out variants ("heldout"), the others in its training ones ("train")."""
    rng = random.Random(f"bench-rl/{seed}/{task_role}")
    wording = "heldout" if task_role == "test" else "train"
    tasks: dict[str, Task] = {}
    for _ in range(1000 * count):
        task, slots, _ = _draw_task(rng)
        if task not in tasks and role(f"{slots['goal']} in {slots['c']}") == task_role:
            tasks[task] = _task(rng, task, slots, rounds, wording)
            if len(tasks) == count:
                return list(tasks.values())
    raise ValueError(f"only {len(tasks)} distinct {task_role} tasks exist; asked for {count}")


def reward_model_pairs(per_module: int, seed: int, rounds: int = 1) -> list[Pair]:
    """Synth pairs of the reward model's groups only, in the training phrasing: `per_module` per module."""
    every_pair_train = DataConfig(train_fraction=1.0, val_fraction=0.0)  # synth's training variants for every pair
    pairs = generate_pairs(4 * per_module, seed, MODULES, every_pair_train, max_rounds=rounds)
    kept: dict[str, list[Pair]] = {m: [] for m in MODULES}
    for pair in pairs:
        if role(pair.group) == "reward_model" and len(kept[pair.target_module]) < per_module:
            kept[pair.target_module].append(pair)
    return [pair for module in MODULES for pair in kept[module]]


def shuffled_labels(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """The control's training data: each pair's sides swapped with probability 1/2, so a label says nothing."""
    rng = random.Random(f"bench-rl/shuffle/{seed}")
    return [
        Pair(p.pair_id, p.target_module, p.task, p.negative, p.positive, p.group) if rng.random() < 0.5 else p
        for p in pairs
    ]
