"""`modrm pairs`: module-level preference pairs mined from RL rollouts, task by task.

Two strategies (docs/pairs.md says when to use which):

- contrast: within a task, a rollout whose outcome beats another's by at least `min_gap`, one pair per module
  whose view differs between the two (both whole trajectories). Noisy by construction: the module compared may
  not be the one that made the outcome worse.
- anchor: module outputs that follow an identical state (the same task and the same text before them, as branched
  rollouts share, and every group shares at its first step) are compared by the mean outcome of the rollouts that
  pass through each: a pair where the means differ by at least `min_gap`, with at least `min_support` rollouts
  behind each side. A side is the trajectory up to and including that output, so the two sides differ in that
  output alone; the target is the module that spoke.

A task gives at most `max_pairs_per_task` pairs, dealt round robin over its modules from a shuffle seeded by
(`seed`, task id): no module crowds out the others, and a task's pairs do not depend on the other tasks. Every
pair's `group` is its task id, so a split never puts one task on both sides; its evidence (rollout ids, outcomes,
strategy, support, the round for anchor) goes in an extra field `evidence` that the pair readers ignore.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from pipeline import trajectory
from pipeline.atomic import atomic_write
from pipeline.data import Pair, Side, pair_to_record
from pipeline.errors import ModrmError
from pipeline.rollouts import Rollout, RolloutFormat, RolloutIndex
from pipeline.trajectory import Trajectory, module_view, module_views, parse_trajectory

STRATEGIES = ("contrast", "anchor")


@dataclass(frozen=True, slots=True)
class MineOptions:
    strategy: str = "contrast"
    min_gap: float = 0.5
    min_support: int = 2  # anchor: rollouts behind each side
    max_pairs_per_task: int = 64
    seed: int = 0

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ModrmError(f"--strategy {self.strategy!r}: must be one of {', '.join(STRATEGIES)}")
        if not (math.isfinite(self.min_gap) and self.min_gap > 0):
            raise ModrmError(f"--min-gap {self.min_gap}: must be a finite number above 0")
        if self.min_support < 1:
            raise ModrmError(f"--min-support {self.min_support}: must be 1 or more")
        if self.max_pairs_per_task < 1:
            raise ModrmError(f"--max-pairs-per-task {self.max_pairs_per_task}: must be 1 or more")


@dataclass
class Summary:
    files: int = 0
    rollouts: int = 0
    tasks: int = 0
    strategy: str = "contrast"
    pairs: Counter = field(default_factory=Counter)  # by module
    skipped: Counter = field(default_factory=Counter)  # rollouts, by reason
    equal_tasks: int = 0  # tasks whose rollouts all have the same outcome

    def lines(self) -> list[str]:
        files = f"{self.files} file" + ("s" if self.files != 1 else "")
        lines = [f"read {self.rollouts} rollouts of {self.tasks} tasks from {files}"]
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            lines.append(f"skipped {sum(self.skipped.values())} rollouts: {reasons}")
        if self.equal_tasks:
            lines.append(f"tasks whose rollouts all have the same outcome (no pairs): {self.equal_tasks}")
        per_module = ", ".join(f"{module} {n}" for module, n in sorted(self.pairs.items())) or "none"
        lines.append(f"{sum(self.pairs.values())} {self.strategy} pairs: {per_module}")
        return lines


@dataclass(slots=True)
class _Parsed:
    rollout: Rollout
    parse: Trajectory
    views: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A pair to be: built only once sampled (`build` gives both sides and the evidence)."""

    module: str
    build: Callable[[], tuple[Side, Side, dict]]


# ---------------------------------------------------------------------------------------------- contrast


def _whole(parsed: _Parsed, module: str) -> Side:
    return Side(parsed.rollout.trajectory, parsed.views[module], parsed.rollout.outcome)


def _evidence(strategy: str, positive: Sequence[_Parsed], negative: Sequence[_Parsed]) -> dict:
    return {
        "strategy": strategy,
        "support": [len(positive), len(negative)],
        "positive_rollouts": [p.rollout.rollout_id for p in positive],
        "negative_rollouts": [p.rollout.rollout_id for p in negative],
        "positive_outcomes": [p.rollout.outcome for p in positive],
        "negative_outcomes": [p.rollout.outcome for p in negative],
    }


def contrast_candidates(rollouts: Sequence[_Parsed], modules: Sequence[str], options: MineOptions) -> list[_Candidate]:
    """Every (better rollout, worse rollout, module) whose outcomes differ by `min_gap` and whose views differ."""

    def candidate(hi: _Parsed, lo: _Parsed, module: str) -> _Candidate:
        return _Candidate(module, lambda: (_whole(hi, module), _whole(lo, module), _evidence("contrast", [hi], [lo])))

    found = []
    for hi in rollouts:
        for lo in rollouts:
            if hi.rollout.outcome - lo.rollout.outcome >= options.min_gap:
                for module in modules:
                    a, b = hi.views[module], lo.views[module]
                    if a and b and a != b:
                        found.append(candidate(hi, lo, module))
    return found


# ---------------------------------------------------------------------------------------------- anchor


@dataclass(slots=True)
class _Branch:
    """One module output at one state, with the rollouts that pass through it."""

    module: str
    round: int | None
    rollouts: list[_Parsed] = field(default_factory=list)
    end: int = 0  # where the output ends in the first rollout's text

    @property
    def mean(self) -> float:
        return sum(p.rollout.outcome for p in self.rollouts) / len(self.rollouts)

    def side(self) -> Side:
        context = self.rollouts[0].rollout.trajectory[: self.end]
        return Side(context, module_view(context, self.module), self.mean)


def _elements(parsed: _Parsed) -> Iterator[tuple[int, int, int | None, str, str]]:
    """(start, end, round, tag, text) of each tagged part of the parse: the parser's own tokens, in its order
    (each token that opens a tag is one part)."""
    text = parsed.rollout.trajectory
    parts = [(r.number, tag, body) for r in parsed.parse.rounds for tag, body in r.parts]
    for (start, end), part in zip(trajectory.part_spans(text), parts, strict=True):
        yield start, end, *part


def _states(rollouts: Sequence[_Parsed], modules: Sequence[str]) -> dict[bytes, dict[tuple, _Branch]]:
    """state (a digest of the text before an output) -> the distinct module outputs that follow it."""
    owner = {tag: module for module in modules for tag in trajectory.MODULE_TAGS[module]}
    states: dict[bytes, dict[tuple, _Branch]] = defaultdict(dict)
    for parsed in rollouts:
        text, digest, done = parsed.rollout.trajectory, hashlib.blake2b(digest_size=16), 0
        for start, end, number, tag, body in _elements(parsed):
            module = owner.get(tag)
            if module is None or not body:
                continue
            digest.update(text[done:start].encode())
            done = start
            branch = states[digest.digest()].setdefault((tag, body), _Branch(module, number, end=end))
            branch.rollouts.append(parsed)
    return states


def anchor_candidates(rollouts: Sequence[_Parsed], modules: Sequence[str], options: MineOptions) -> list[_Candidate]:
    """Every two outputs of one module at one state whose mean outcomes differ by `min_gap`, each with
    `min_support` rollouts behind it."""

    def candidate(hi: _Branch, lo: _Branch) -> _Candidate:
        def build() -> tuple[Side, Side, dict]:
            return hi.side(), lo.side(), _evidence("anchor", hi.rollouts, lo.rollouts) | {"round": hi.round}

        return _Candidate(hi.module, build)

    found = []
    for branches in _states(rollouts, modules).values():
        supported = [b for b in branches.values() if len(b.rollouts) >= options.min_support]
        for hi in supported:
            for lo in supported:
                if hi.module == lo.module and hi.mean - lo.mean >= options.min_gap:
                    found.append(candidate(hi, lo))
    return found


# ---------------------------------------------------------------------------------------------- one task


def sample_evenly(candidates: Sequence[_Candidate], cap: int, rng: random.Random) -> list[_Candidate]:
    """At most `cap` candidates, dealt round robin over modules (in name order) from a shuffle of each module's."""
    queues: dict[str, list[_Candidate]] = defaultdict(list)
    for candidate in candidates:
        queues[candidate.module].append(candidate)
    for module in sorted(queues):
        rng.shuffle(queues[module])
    chosen: list[_Candidate] = []
    while len(chosen) < cap and any(queues.values()):
        for module in sorted(queues):
            if queues[module] and len(chosen) < cap:
                chosen.append(queues[module].pop())
    return chosen


def _usable(rollouts: list[Rollout], modules: Sequence[str], summary: Summary) -> list[_Parsed]:
    """The task's rollouts that can be compared, parsed once, in rollout_id order (so the pairs do not depend on
    the order of the input); what is left out is counted by reason."""
    first = rollouts[0]
    seen: dict[str, str] = {}
    usable = []
    for rollout in rollouts:
        if rollout.task != first.task:
            raise ModrmError(f"{rollout.where}, field 'task': differs from the task of {first.where} (same task_id)")
        if rollout.rollout_id in seen:
            raise ModrmError(
                f"{rollout.where}, field 'rollout_id': {rollout.rollout_id!r} is also at {seen[rollout.rollout_id]}"
            )
        seen[rollout.rollout_id] = rollout.where
        if rollout.outcome is None:
            summary.skipped["without an outcome"] += 1
            continue
        parse = parse_trajectory(rollout.trajectory)
        views = module_views(parse, modules)
        if not any(views.values()):
            summary.skipped["with no module output"] += 1
            continue
        usable.append(_Parsed(rollout, parse, views))
    usable.sort(key=lambda p: p.rollout.rollout_id)
    if len(usable) == 1:
        summary.skipped["alone in their task"] += 1
        return []
    if usable and len({p.rollout.outcome for p in usable}) == 1:
        summary.equal_tasks += 1
        return []
    return usable


def mine_task(rollouts: list[Rollout], options: MineOptions, summary: Summary) -> list[tuple[Pair, dict]]:
    """One task's pairs, each with its evidence."""
    modules = list(trajectory.MODULE_TAGS)
    usable = _usable(rollouts, modules, summary)
    find = contrast_candidates if options.strategy == "contrast" else anchor_candidates
    task_id, task = rollouts[0].task_id, rollouts[0].task
    rng = random.Random(f"{options.seed}/{task_id}")
    pairs = []
    for number, candidate in enumerate(sample_evenly(find(usable, modules, options), options.max_pairs_per_task, rng)):
        positive, negative, evidence = candidate.build()
        pairs.append((Pair(f"{task_id}#{number}", candidate.module, task, positive, negative, group=task_id), evidence))
        summary.pairs[candidate.module] += 1
    return pairs


# ---------------------------------------------------------------------------------------------- the command


def mine_rollouts(
    paths: Sequence[str | Path], out: str | Path, options: MineOptions, fmt: RolloutFormat, progress: bool = True
) -> Summary:
    """Read the rollouts (pass one: check every record, index where each task's rollouts are), then mine task by
    task into `out` (JSON lines, atomic: a problem anywhere leaves nothing written)."""
    options.check()
    with tqdm(desc="index rollouts", unit=" rollouts", disable=not progress, dynamic_ncols=True) as bar:
        index = RolloutIndex(paths, fmt, bar)
    summary = Summary(files=len(index.paths), rollouts=len(index), tasks=len(index.task_numbers))
    summary.strategy = options.strategy

    def write(tmp: Path) -> None:
        tasks = tqdm(index.tasks(), desc="mine pairs", unit=" tasks", total=summary.tasks, disable=not progress)
        with tmp.open("w", encoding="utf-8") as handle:
            for rollouts in tasks:
                for pair, evidence in mine_task(rollouts, options, summary):
                    handle.write(json.dumps(pair_to_record(pair) | {"evidence": evidence}) + "\n")

    atomic_write(out, write)
    return summary
