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

The candidates are built by synth (`pipeline.synth.candidate_task`, from its own phrase bank), so the texts are
exactly the ones the reward model's pairs are made of.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import DataConfig
from pipeline.data import Pair, Side, assign_split
from pipeline.synth import CandidateTask, candidate_task, generate_pairs
from pipeline.trajectory import module_view

MODULES = ("reflection", "planner", "executor", "memory")
KINDS = ("good", "subtle", "blatant")  # the K = 3 candidates of every decision
_KIND = {"good": "good", "blatant": "blatant"}  # synth's other kinds are subtle
# Groups by a hash (pipeline.data.assign_split): "train" -> the reward model's pairs, "val" -> the policy's training
# episodes, "test" -> the test episodes.
SPLIT = DataConfig(train_fraction=0.5, val_fraction=0.25, split_seed=25)
ROLE_OF_SPLIT = {"train": "reward_model", "val": "policy", "test": "test"}
# P(outcome = 1 | b wrong picks) = FLOOR + SCALE * DECAY ** b: 0.95 with none, 0.28 with one, 0.09 with two...
FLOOR, SCALE, DECAY = 0.02, 0.93, 0.28


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
    """A task and its candidates: candidates[round][module] is that decision's K candidates, in shuffled order;
    `drawn` is synth's, which writes the trajectories."""

    task: str
    group: str
    candidates: tuple[tuple[tuple[Candidate, ...], ...], ...]
    drawn: CandidateTask

    @classmethod
    def of(cls, drawn: CandidateTask) -> Task:
        """Synth's candidates, each kind one of KINDS."""
        candidates = tuple(
            tuple(tuple(Candidate(texts, _KIND.get(kind, "subtle")) for kind, texts in choices) for choices in options)
            for options in drawn.candidates
        )
        return cls(drawn.task, drawn.group, candidates, drawn)

    @property
    def decisions(self) -> int:
        return len(self.candidates) * len(MODULES)

    def trajectory(self, picks: Sequence[int]) -> str:
        """The tagged trajectory (synth's format) of one pick per decision, decisions round by round, modules in
        MODULES order."""
        return self.drawn.trajectory(picks)

    def good_picks(self) -> list[int]:
        return [[c.good for c in choices].index(True) for options in self.candidates for choices in options]

    def wrong(self, picks: Sequence[int]) -> np.ndarray:
        """Per decision, whether the pick was wrong."""
        flat = [choices for options in self.candidates for choices in options]
        return np.array([not choices[p].good for choices, p in zip(flat, picks, strict=True)])


def role(group: str) -> str:
    """Which part of the experiment a task group belongs to: reward_model, policy or test."""
    return ROLE_OF_SPLIT[assign_split(group, SPLIT.train_fraction, SPLIT.val_fraction, SPLIT.split_seed)]


def draw_tasks(count: int, task_role: str, seed: int, rounds: int = 1) -> list[Task]:
    """`count` distinct tasks of groups in `task_role` (a ROLE_OF_SPLIT value), the same for the same arguments; test
    tasks in synth's held-out variants ("heldout"), the others in its training ones ("train")."""
    rng = random.Random(f"bench-rl/{seed}/{task_role}")
    wording = "heldout" if task_role == "test" else "train"
    tasks: dict[str, Task] = {}
    for _ in range(1000 * count):
        drawn = candidate_task(rng, rounds, wording, lambda task, group: task not in tasks and role(group) == task_role)
        if drawn is not None:
            tasks[drawn.task] = Task.of(drawn)
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


def blatant_pairs(per_module: int, seed: int) -> list[Pair]:
    """Pairs of the reward model's groups, in the training phrasing, whose negative is always the blatant output: a
    task's all-good trajectory against the same with one module's pick blatant, `per_module` tasks, one pair per
    module each. A reward model trained on them never saw a subtle failure, the kind a learning policy meets."""
    pairs = []
    for number, task in enumerate(draw_tasks(per_module, "reward_model", seed)):
        good = task.good_picks()
        good_text = task.trajectory(good)
        for d, choices in enumerate(choices for options in task.candidates for choices in options):
            module = MODULES[d % len(MODULES)]
            bad_text = task.trajectory([*good[:d], [c.kind for c in choices].index("blatant"), *good[d + 1 :]])
            positive = Side(good_text, module_view(good_text, module), 1.0)
            negative = Side(bad_text, module_view(bad_text, module), 0.0)
            pairs.append(Pair(f"{module}_{number}", module, task.task, positive, negative, task.group))
    return sorted(pairs, key=lambda p: MODULES.index(p.target_module))


def shuffled_labels(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """The control's training data: each pair's sides swapped with probability 1/2, so a label says nothing."""
    rng = random.Random(f"bench-rl/shuffle/{seed}")
    return [
        Pair(p.pair_id, p.target_module, p.task, p.negative, p.positive, p.group) if rng.random() < 0.5 else p
        for p in pairs
    ]
