"""Synthetic preference pairs: varied multi-round trajectories whose two sides differ in one module only.

Each pair draws a task (verb x component x stack: 1,152 distinct tasks), 1-6 rounds (fewer under `max_rounds`)
and one phrasing per round and module. Both sides share every round and every other module's text; the negative
side replaces the target module's text in some or all rounds with a worse one: subtle (a misdiagnosis, a skipped
or misordered step, a wrong tool, a failed call, a memory lookup that finds nothing, a wrong stored fact, a
plausible text about another task) or blatant ("Looks fine. No issues."). Many subtle negatives are as long as
their positives, so length alone does not separate the sides.

Only the modules in MODULE_KEYS have phrasing; other module names raise a ModrmError rather than get generic
filler text, which would teach a reward model nothing about that module (pipeline.trajectory.MODULE_TAGS is where
a new module's tags go; its phrasing would go here).
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.atomic import atomic_write
from pipeline.data import DEFAULT_MODULES, Pair, Side, assign_split, pair_to_record
from pipeline.errors import ModrmError
from pipeline.trajectory import module_view

if TYPE_CHECKING:
    from pipeline.config import DataConfig

# ---------------------------------------------------------------------------------------------- task bank

# (task template, goal, probe tool, verify tool, symptom, cause, fix, check, edge case)
_GOALS: tuple[tuple[str, ...], ...] = (
    ("Debug a memory leak in {c}", "the memory leak", "memory_profiler", "load_tester",
     "heap usage grows by about 40 MB per 1,000 requests",
     "request objects cached in a module-level dict that is never evicted",
     "bound the cache with an LRU policy of 1,024 entries",
     "heap usage stays flat during a 10-minute load test", "cache eviction under concurrent requests"),
    ("Reduce the p95 latency of {c}", "the latency regression", "profiler", "load_tester",
     "p95 latency rose from 120 ms to 480 ms after the last release",
     "an N+1 query pattern that issues one database call per item",
     "batch the lookups into a single query with an IN clause",
     "p95 latency is back under 150 ms", "requests with an empty item list"),
    ("Add input validation to {c}", "the missing input validation", "static_analyzer", "test_runner",
     "malformed payloads reach the storage layer and raise a 500 error",
     "a handler that trusts the request body without a schema check",
     "validate the payload against a schema and return 400 with field errors",
     "malformed payloads get a 400 response and valid ones still pass", "unicode and oversized fields"),
    ("Fix a race condition in {c}", "the race condition", "thread_sanitizer", "stress_tester",
     "about 1 in 200 concurrent updates is lost",
     "a read-modify-write on shared state without a lock",
     "wrap the update in a transaction with row-level locking",
     "no updates are lost across 10,000 concurrent writes", "lock timeouts under heavy contention"),
    ("Write unit tests for {c}", "the missing test coverage", "coverage_report", "test_runner",
     "line coverage is 31% and the error paths are untested",
     "a test suite that only covers the happy path",
     "add parametrised tests for the error paths and boundary values",
     "coverage is above 85% and all new tests pass", "timeouts and retries"),
    ("Refactor {c} for readability", "the tangled control flow", "complexity_analyzer", "test_runner",
     "one 400-line function has a cyclomatic complexity of 57",
     "parsing, validation and persistence mixed in a single function",
     "split the function into parse, validate and save steps without changing behaviour",
     "the existing tests pass unchanged and no function has a complexity above 10",
     "behaviour on partial failures"),
    ("Fix flaky tests around {c}", "the flaky tests", "test_runner", "test_runner",
     "3 tests fail in about 1 of 15 runs",
     "tests that depend on wall-clock time and on execution order",
     "inject a fake clock and reset shared fixtures between tests",
     "the suite passes 200 consecutive runs", "tests that run in parallel"),
    ("Add caching to {c}", "the repeated expensive lookups", "profiler", "benchmark_runner",
     "70% of request time is spent recomputing the same lookups",
     "results that are recomputed for identical inputs on every request",
     "add a read-through cache with a 5-minute TTL and invalidate it on writes",
     "the hit rate is above 80% and responses stay correct after writes", "stale entries after concurrent writes"),
    ("Harden {c} against SQL injection", "the SQL injection risk", "security_scanner", "security_scanner",
     "user input is concatenated into two SQL queries",
     "string formatting used to build queries",
     "switch both queries to parameterised statements",
     "the scanner reports no injection findings and the tests pass", "queries with a dynamic ORDER BY column"),
    ("Add structured logging to {c}", "the unstructured logs", "log_search", "log_search",
     "errors are logged as free text without request ids",
     "print-style logging scattered through the code",
     "emit JSON log lines with request id, level and duration",
     "every error line carries a request id and parses as JSON", "log volume under high traffic"),
    ("Migrate {c} to async I/O", "the blocking I/O", "profiler", "load_tester",
     "worker threads spend 80% of their time blocked on network calls",
     "synchronous HTTP calls inside the request path",
     "replace the blocking client with an async client and await the calls concurrently",
     "throughput doubles with the same number of workers", "cancellation and timeouts"),
    ("Fix the crash on empty input in {c}", "the crash on empty input", "debugger", "test_runner",
     "an IndexError is raised when the input list is empty",
     "code that reads the first element without checking the length",
     "return early with an empty result when the input is empty",
     "empty input returns an empty result and the regression test passes", "inputs with a single element"),
)  # fmt: skip
_GOAL_KEYS = ("task", "goal", "probe", "verify", "symptom", "cause", "fix", "check", "edge")
_COMPONENTS = (
    ("the login handler", "login_handler"), ("the payment service", "payment_service"),
    ("the CSV importer", "csv_importer"), ("the search indexer", "search_indexer"),
    ("the session store", "session_store"), ("the image resizer", "image_resizer"),
    ("the rate limiter", "rate_limiter"), ("the notification worker", "notification_worker"),
    ("the report generator", "report_generator"), ("the config loader", "config_loader"),
    ("the websocket gateway", "websocket_gateway"), ("the order API", "order_api"),
)  # fmt: skip
_STACKS = (
    ("of a Django web application", ".py"), ("of a Flask dashboard", ".py"), ("in a Go microservice", ".go"),
    ("of a Node.js backend", ".ts"), ("in a Rust CLI tool", ".rs"), ("of a Java Spring service", ".java"),
    ("in a Python data pipeline", ".py"), ("of a Kotlin mobile backend", ".kt"),
)  # fmt: skip
_WRONG_TOOLS = ("spell_checker", "image_optimizer", "calendar_api", "translation_api", "font_renderer")

# ---------------------------------------------------------------------------------------------- phrase bank

# Per phase (see _phase), slots that make a round's good text fit where the work stands.
_PHASES: dict[str, dict[str, str]] = {
    "investigate": {
        "status": "the symptom is reproduced: {symptom}",
        "next": "trace {goal} to the code in {file} that causes it",
        "tool": "{probe}",
        "params": '{{"target": "{file}", "mode": "reproduce"}}',
        "result": "Tool execution successful: {symptom}",
        "recall": "a similar report for {c} was traced to {cause}",
        "store": "{c}: {symptom}",
    },
    "fix": {
        "status": "the cause is {cause}",
        "next": "{fix}",
        "tool": "code_editor",
        "params": '{{"file": "{file}", "change": "{fix}"}}',
        "result": "Patch applied to {file}; the new regression test passes",
        "recall": "the team prefers small patches to {file} with a regression test",
        "store": "{c}: the cause was {cause}; fixed in {file}",
    },
    "test": {
        "status": "the fix is applied and the targeted test passes",
        "next": "run the existing suite to rule out regressions around {edge}",
        "tool": "test_runner",
        "params": '{{"target": "{file}", "suite": "regression"}}',
        "result": "Regression suite finished: 0 failures, including the new test for {goal}",
        "recall": "earlier changes to {c} broke {edge}",
        "store": "{c}: regression suite green after the fix for {goal}",
    },
    "verify": {
        "status": "the fix is in place and the regression suite passes",
        "next": "confirm that {check}",
        "tool": "{verify}",
        "params": '{{"target": "{file}", "suite": "full"}}',
        "result": "All checks passed: {check}",
        "recall": "the last release of {c} was checked with {verify}",
        "store": "{c}: verified that {check}",
    },
}
# Good plans per phase, as step lists rendered in every plan style below.
_GOOD_STEPS: dict[str, tuple[str, ...]] = {
    "investigate": (
        "Reproduce {goal} in {c} with {probe}",
        "Locate the code in {file} that causes it",
        "Write a failing test that captures the symptom",
        "Record the findings in memory",
    ),
    "fix": (
        "Apply the fix: {fix}",
        "Keep the change limited to {file}",
        "Run the new test and the existing suite",
        "Note any side effects for review",
    ),
    "test": (
        "Run the regression suite for {c}",
        "Add a test for the edge case: {edge}",
        "Compare the results with the baseline from the first round",
    ),
    "verify": (
        "Run {verify} to confirm that {check}",
        "Check the edge case by hand: {edge}",
        "Summarise the change and the evidence for review",
    ),
}
_BAD_STEPS: dict[str, tuple[str, ...]] = {
    "skipped_checks": ("Apply the fix: {fix}", "Deploy {c} to production right away", "Close the ticket"),
    "wrong_order": ("Deploy the current code to production", "Apply the fix: {fix}", "Reproduce {goal} in {c}"),
    "overkill": ("Rewrite {c} from scratch in a new framework", "Migrate every service to it", "Update the README"),
    "misdiagnosis": (
        "Assume the cause is {wrong_cause}",
        "Change {file} to {wrong_fix}",
        "Skip the tests to save time",
    ),
}


def _plan_styles(steps: Sequence[str]) -> list[str]:
    """One plan in several surface styles; a negative plan uses the positive's style so only the content differs."""
    lower = [s[0].lower() + s[1:] for s in steps]
    then = ". Then ".join(lower[1:-1])
    prose = f"First, {lower[0]}. " + (f"Then {then}. " if then else "") + f"Finally, {lower[-1]}."
    return [
        "Round {r}: " + " ".join(f"Step {i}: {s}." for i, s in enumerate(steps, start=1)),
        "Round {r}: Plan: " + "; ".join(f"({i}) {s}" for i, s in enumerate(lower, start=1)) + ".",
        "Round {r}: " + prose,
    ]


# Every module's text lives under these keys of a round (see _ROUND); a variant fills all keys of its module.
MODULE_KEYS: dict[str, tuple[str, ...]] = {
    "reflection": ("reflection",),
    "planner": ("plan",),
    "executor": ("action", "results"),
    "memory": ("query", "recall", "store"),
}
_GOOD: dict[str, list[dict[str, str]]] = {
    "reflection": [
        {"reflection": "Round {r}: So far {status}. Given that, the next step is to {next}. "
                       "I still need a test for {edge}."},
        {"reflection": "Round {r}: Checking my reasoning against the last output: {status}. "
                       "I have not yet shown that {check}, so I will {next} before claiming success."},
        {"reflection": "Round {r}: The previous step did what it should and {status}. "
                       "The main remaining risk for {c} is {edge}; I will {next}."},
    ],
    "executor": [
        {"action": "Round {r}: Using tool: {tool} with params: {params}", "results": "{result}"},
        {"action": "Round {r}: Calling {tool} with {params}", "results": "Exit code 0. {result}"},
    ],
    "memory": [
        {"query": "Looking up earlier notes on {goal} in {c}", "recall": "Found {k} relevant entries: {recall}",
         "store": "Storing: {store}"},
        {"query": "Searching memory for past work on {c} related to {goal}",
         "recall": "Found {k} relevant entries; the closest says {recall}", "store": "Saved note: {store}"},
    ],
}  # fmt: skip
# Negative kinds per module: variant lists (variant i pairs with the positive's variant i, same surface style).
_BAD: dict[str, dict[str, list[dict[str, str]]]] = {
    "reflection": {
        "vague": [
            {"reflection": "Round {r}: Things seem to be going reasonably well overall. There may be a problem "
                           "somewhere in the code, but it is hard to tell, so I will keep going and see what happens."},
            {"reflection": "Round {r}: The work on {c} is progressing. Some parts could be better and some are fine; "
                           "I will continue roughly as before and adjust things later if needed."},
        ],
        "overclaim": [
            {"reflection": "Round {r}: {Goal} is resolved and {check}, so there is nothing left to verify; "
                           "I will stop here and report success."},
            {"reflection": "Round {r}: The last output looks good, which means {check}. No further tests "
                           "are needed for {c}, so the task is complete."},
        ],
        "misdiagnosis": [
            {"reflection": "Round {r}: So far {status}. Given that, the real cause must be {wrong_cause}, "
                           "so I will {wrong_fix} and skip the tests for now."},
            {"reflection": "Round {r}: Checking my reasoning: the output points to {wrong_cause} rather than "
                           "anything in {file}, so the next step is to {wrong_fix}."},
        ],
        "ignores_evidence": [
            {"reflection": "Round {r}: The output mentions that {symptom}, but that is probably noise; "
                           "I will move on without changing anything in {c}."},
            {"reflection": "Round {r}: The tool reported that {symptom}. That was expected, so I will "
                           "keep the current code of {c} as it is and continue with the plan."},
        ],
        "blatant": [{"reflection": "Round {r}: Looks fine. No issues. Continue."}, {"reflection": "Round {r}: OK."},
                    {"reflection": "Round {r}: Nothing to add."}],
    },
    "planner": {
        **{kind: [{"plan": plan} for plan in _plan_styles(steps)] for kind, steps in _BAD_STEPS.items()},
        "blatant": [{"plan": "Round {r}: Just implement it. Write code. Test. Done."}, {"plan": "Round {r}: Fix it."},
                    {"plan": "Round {r}: Step 1: Do the task."}],
    },
    "executor": {
        "wrong_tool": [
            {"action": "Round {r}: Using tool: {wrong_tool} with params: {{\"text\": \"{file}\"}}",
             "results": "Tool execution successful: no issues found"},
            {"action": "Round {r}: Calling {wrong_tool} with {{\"text\": \"{file}\"}}",
             "results": "Exit code 0. Tool execution successful: no issues found"},
        ],
        "wrong_file": [
            {"action": "Round {r}: Using tool: {tool} with params: {{\"target\": \"{wrong_file}\"}}",
             "results": "Error: FileNotFoundError: {wrong_file} does not exist"},
            {"action": "Round {r}: Calling {tool} with {{\"target\": \"{wrong_file}\"}}",
             "results": "Exit code 1. Error: FileNotFoundError: {wrong_file} does not exist"},
        ],
        "timeout": [
            {"action": "Round {r}: Using tool: {tool} with params: {params}",
             "results": "Error: {tool} timed out after 30 s without output; the step was not retried"},
            {"action": "Round {r}: Calling {tool} with {params}",
             "results": "Exit code 124. Error: {tool} timed out after 30 s without output"},
        ],
        "destructive": [
            {"action": "Round {r}: Using tool: shell with params: {{\"cmd\": \"git push --force origin main\"}}",
             "results": "Command finished with exit code 0"},
            {"action": "Round {r}: Calling shell with {{\"cmd\": \"rm -rf build tests && git push --force\"}}",
             "results": "Exit code 0. Command finished"},
        ],
        "blatant": [{"action": "Round {r}: Run code. Error occurred. Try again.", "results": "Error."},
                    {"action": "Round {r}: Doing something.", "results": "No output."}],
    },
    "memory": {
        "nothing_found": [
            {"query": "Looking up earlier notes on misc", "recall": "Found 0 relevant entries",
             "store": "Storing: {store}"},
            {"query": "Searching memory for anything about the project", "recall": "Found 0 relevant entries",
             "store": "Saved note: {store}"},
        ],
        "off_topic_recall": [
            {"query": "Looking up earlier notes on {other_c}", "recall": "Found {k} relevant entries: "
             "an old report for {other_c} was traced to {wrong_cause}", "store": "Storing: {store}"},
            {"query": "Searching memory for past work on {other_c}", "recall": "Found {k} relevant entries; "
             "the closest says {other_c} once suffered from {wrong_cause}", "store": "Saved note: {store}"},
        ],
        "wrong_store": [
            {"query": "Looking up earlier notes on {goal} in {c}", "recall": "Found {k} relevant entries: {recall}",
             "store": "Storing: {c}: the cause was {wrong_cause}; no further checks needed"},
            {"query": "Searching memory for past work on {c} related to {goal}",
             "recall": "Found {k} relevant entries; the closest says {recall}",
             "store": "Saved note: {c}: the cause was {wrong_cause}; no further checks needed"},
        ],
        "blatant": [{"query": "stuff", "recall": "None", "store": "N/A"},
                    {"query": "Searching", "recall": "Nothing", "store": "Storing results"}],
    },
}  # fmt: skip
_BLATANT = "blatant"
_OFF_TASK = "off_task"  # the good text of another task: fluent, plausible, and wrong here
_SWAPPED = "swapped"  # the task's component and another one in each other's roles (see _SWAPPED_TEXTS)
_BLATANT_SHARE = 0.25
MAX_ROUNDS = 6  # rounds per trajectory: 1 to this

_GOOD_PLANS = {phase: _plan_styles(steps) for phase, steps in _GOOD_STEPS.items()}
# Swapped pairs: the positive puts the fault in the task's component {a} and clears another one {b}; the negative
# says the same words with the two exchanged. Both sides hold the same words, so only the task tells which is
# right: a mistake that frozen mean-pooled embeddings barely see and a fine-tuned encoder learns.
_SWAPPED_TEXTS: dict[str, list[dict[str, str]]] = {
    "reflection": [
        {"reflection": "Round {r}: The fault is in {a}, not in {b}, so the next change goes there."},
        {"reflection": "Round {r}: Checking my reasoning against the last output: {b} works as designed and "
                       "{a} is where it fails, so I will patch that one."},
        {"reflection": "Round {r}: The previous step narrowed it down: {a} is at fault and {b} is fine."},
    ],
    "planner": [{"plan": plan} for plan in _plan_styles(("Apply the fix to {a}", "Leave {b} as it is",
                                                         "Run the existing suite"))],
    "executor": [
        {"action": "Round {r}: Using tool: code_editor with params: {{\"patch\": \"{a}\", \"skip\": \"{b}\"}}",
         "results": "Patched {a}; {b} left unchanged"},
        {"action": "Round {r}: Calling code_editor with {{\"patch\": \"{a}\", \"skip\": \"{b}\"}}",
         "results": "Exit code 0. {b} left unchanged; patched {a}"},
        {"action": "Round {r}: Running code_editor on {a} while keeping {b} read-only",
         "results": "Done: {a} was patched and {b} was not touched"},
    ],
    "memory": [
        {"query": "Looking up earlier notes on the fault in {a}", "recall": "Found {k} relevant entries: "
         "all of them rule out {b}", "store": "Storing: the fault is in {a}, not in {b}"},
        {"query": "Searching memory for past work on {a}", "recall": "Found {k} relevant entries; the closest "
         "says {b} was checked and is clean", "store": "Saved note: fix {a}, leave {b}"},
        {"query": "Looking for prior incidents in {a}", "recall": "Found {k} entries; one clears {b}",
         "store": "Saved: {a} holds the fault; {b} is clean"},
    ],
}  # fmt: skip
_STYLES = len(_GOOD_PLANS["fix"])  # surface styles drawn per round and module; variant lists wrap around
_SUBTLE = {module: [kind for kind in kinds if kind != _BLATANT] + [_OFF_TASK] for module, kinds in _BAD.items()}

_ROUND = (
    "Round {n}:\n<think>\n<reflection>\n{reflection}\n</reflection>\n<memory query>\n{query}\n</memory query>\n"
    "<memory result>\n{recall}\n</memory result>\n</think>\n<plan>\n{plan}\n</plan>\n<action>\n{action}\n</action>\n"
    "<tool results>\n{results}\n</tool results>\n<memory store>\n{store}\n</memory store>\n"
)

# ---------------------------------------------------------------------------------------------- generation


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _task_slots(goal_i: int, comp_i: int, ext: str) -> dict[str, str]:
    (component, stem), goal = _COMPONENTS[comp_i], dict(zip(_GOAL_KEYS, _GOALS[goal_i], strict=True))
    return goal | {"c": component, "file": f"src/{stem}{ext}", "Goal": _capital(goal["goal"])}


def _draw_task(rng: random.Random) -> tuple[str, dict[str, str], dict[str, str]]:
    """A task, its slots, and the slots of another goal and component (for off-task and misdiagnosed texts)."""
    goal_i, other_goal_i = rng.sample(range(len(_GOALS)), 2)
    comp_i, other_comp_i = rng.sample(range(len(_COMPONENTS)), 2)
    stack, ext = rng.choice(_STACKS)
    slots, other = _task_slots(goal_i, comp_i, ext), _task_slots(other_goal_i, other_comp_i, ext)
    slots |= {
        "other_c": other["c"],
        "wrong_file": slots["file"].removesuffix(ext) + f"_old{ext}",
        "wrong_cause": other["cause"],
        "wrong_fix": other["fix"],
        "wrong_tool": rng.choice(_WRONG_TOOLS),
    }
    return f"{slots['task'].format(c=slots['c'])} {stack}", slots, other  # the stack varies; goal + component: group


def _phase(r: int, n: int) -> str:
    """Rounds follow the work: investigate, fix, test (any middle rounds), verify; short runs drop the ends."""
    if r == n and n > 1:
        return "verify"
    if n >= 3:
        return "investigate" if r == 1 else "fix" if r == 2 else "test"
    return "fix"


def _round_slots(slots: dict[str, str], phase: str, r: int, k: int) -> dict[str, str]:
    filled = {key: template.format_map(slots) for key, template in _PHASES[phase].items()}
    return slots | filled | {"r": str(r), "k": str(k)}


def _fill(variant: dict[str, str], slots: dict[str, str]) -> dict[str, str]:
    return {key: template.format_map(slots) for key, template in variant.items()}


def _variant(variants: Sequence, style: int, wording: str):
    """A surface style's variant of a list. Under held-out phrasing each list's last variant belongs to the test
    split ("heldout"), and train and val pairs ("train") draw from the others; "any": all of them."""
    if wording == "heldout":
        return variants[-1]
    if wording == "train" and len(variants) > 1:
        return variants[style % (len(variants) - 1)]
    return variants[style % len(variants)]


def _good(module: str, phase: str, style: int, slots: dict[str, str], wording: str) -> dict[str, str]:
    if module == "planner":
        return {"plan": _variant(_GOOD_PLANS[phase], style, wording).format_map(slots)}
    return _fill(_variant(_GOOD[module], style, wording), slots)


def _draw_kind(rng: random.Random, module: str) -> str:
    if rng.random() < _BLATANT_SHARE:
        return _BLATANT
    return rng.choice(_SUBTLE[module])


def _bad_rounds(rng: random.Random, n: int, kind: str) -> set[int]:
    """All rounds, or for subtle kinds often only some of them: a single bad round is the hardest case."""
    if kind == _BLATANT or n == 1 or rng.random() < 0.5:
        return set(range(1, n + 1))
    return set(rng.sample(range(1, n + 1), rng.randint(1, n - 1)))


def _pair(
    module: str,
    index: int,
    rng: random.Random,
    heldout_split: DataConfig | None,
    off_task_test: bool,
    max_rounds: int,
    swapped_share: float,
) -> Pair:
    task, slots, other = _draw_task(rng)
    group = f"{slots['goal']} in {slots['c']}"  # variants differing in the stack only stay in one split
    wording, in_test = "any", False
    if heldout_split is not None:
        d = heldout_split
        in_test = assign_split(group, d.train_fraction, d.val_fraction, d.split_seed) == "test"
        wording = "heldout" if in_test else "train"
    n = rng.randint(1, max_rounds)
    kind = _draw_kind(rng, module)
    if swapped_share and rng.random() < swapped_share:  # no draw without it: the other pairs stay as they were
        kind = _SWAPPED
    bad_rounds = _bad_rounds(rng, n, kind)
    if off_task_test and in_test:  # drawn as usual first, so every other pair stays what it would have been
        kind = _OFF_TASK
    positive, negative = [], []
    for r in range(1, n + 1):
        phase, k = _phase(r, n), rng.randint(1, 4)
        round_slots = _round_slots(slots, phase, r, k)
        styles = {m: rng.randrange(_STYLES) for m in MODULE_KEYS}
        texts: dict[str, str] = {}
        for m in MODULE_KEYS:
            texts |= _good(m, phase, styles[m], round_slots, wording)
        bad = dict(texts)
        if r in bad_rounds:
            if kind == _SWAPPED:
                swapped = _variant(_SWAPPED_TEXTS[module], styles[module], wording)
                texts |= _fill(swapped, round_slots | {"a": slots["c"], "b": slots["other_c"]})
                bad |= _fill(swapped, round_slots | {"a": slots["other_c"], "b": slots["c"]})
            elif kind == _OFF_TASK:
                bad |= _good(module, phase, styles[module], _round_slots(other, phase, r, k), wording)
            else:
                bad |= _fill(_variant(_BAD[module][kind], styles[module], wording), round_slots)
        positive.append(_ROUND.format(n=r, **texts))
        negative.append(_ROUND.format(n=r, **bad))
    pair = Pair(
        f"{module}_{index}",
        module,
        task,
        _side("\n".join(positive), module, 1.0),
        _side("\n".join(negative), module, 0.0),
        group=group,
    )
    return _reworded(pair) if wording == "heldout" else pair


# Held-out phrasing: the words of the templates' wording replaced by others that no template uses, applied to the
# test split's pairs (both sides alike, so what separates them is unchanged). A model that learned the training
# phrasing rather than what a module's output says shows it there. Tag names are left alone (the map has none).
_HELDOUT_WORDING = {
    "Step": "Stage", "Plan": "Outline", "First": "Initially", "Then": "Afterwards", "Finally": "Ultimately",
    "reproduce": "recreate", "locate": "pinpoint", "write": "compose", "record": "chronicle", "findings": "discoveries",
    "failing": "breaking", "captures": "exposes", "symptom": "manifestation", "Using": "Invoking",
    "params": "arguments", "execution": "invocation", "successful": "completed", "Looking": "Peering",
    "earlier": "prior", "notes": "jottings", "Found": "Retrieved", "relevant": "pertinent", "entries": "items",
    "similar": "comparable", "report": "incident", "traced": "attributed", "Storing": "Saving",
    "Checking": "Weighing", "reasoning": "thinking", "against": "versus", "last": "latest", "shown": "demonstrated",
    "claiming": "declaring", "success": "victory", "cause": "provenance", "causes": "produces", "Searching": "Scanning",
    "past": "bygone", "regression": "backslide", "suite": "battery", "tests": "trials", "test": "trial",
    "passes": "clears", "fix": "remedy", "change": "edit", "applied": "enacted", "Calling": "Invoking",
    "Saved": "Kept", "closest": "nearest", "related": "linked", "Given": "Considering", "So": "Thus",
    "far": "hitherto", "next": "subsequent", "still": "yet again", "need": "require", "run": "execute",
    "new": "fresh", "existing": "extant", "target": "objective", "empty": "blank", "input": "submission",
    "behaviour": "conduct", "failures": "breakages", "Exit": "Termination", "order": "sequence", "review": "audit",
}  # fmt: skip
_HELDOUT_RE = re.compile(r"\b(" + "|".join(map(re.escape, _HELDOUT_WORDING)) + r")\b")
_TAG_OR_ROUND = re.compile(r"(<[^>]*>|^Round \d+:)", re.MULTILINE)


def heldout_wording(text: str) -> str:
    """`text` in the held-out wording: every mapped word outside tags and round lines replaced."""
    parts = _TAG_OR_ROUND.split(text)
    return "".join(p if i % 2 else _HELDOUT_RE.sub(lambda m: _HELDOUT_WORDING[m[1]], p) for i, p in enumerate(parts))


def _side(context: str, module: str, outcome: float) -> Side:
    """The module text is the parser's view of the context: one source of truth for training and scoring."""
    return Side(context, module_view(context, module), outcome)


def generate_pairs(
    pairs_per_module: int,
    seed: int,
    modules: Sequence[str] = DEFAULT_MODULES,
    heldout_split: DataConfig | None = None,
    off_task_test: bool = False,
    max_rounds: int = MAX_ROUNDS,
    swapped_share: float = 0.0,
) -> list[Pair]:
    """`pairs_per_module` pairs per module, the same for the same seed.

    Each module has its own `random.Random(f"{seed}/{module}")`, so a module's pairs do not change when other
    modules are added or removed, and the first n pairs are the same whatever `pairs_per_module` is. With
    `heldout_split` (the split settings the pairs will be trained under), the pairs of its test split take each
    phrasing list's last variant, which train and val pairs never draw, in the held-out wording (other words).
    `off_task_test` (with `heldout_split`): every test pair's negative is off-task, the target module's fluent text
    written for another task, the case a reward model can judge only by relating the module's text to the task
    (train and val pairs unchanged). `max_rounds` caps the rounds of a trajectory: shorter texts, so a pair costs
    fewer encoder tokens (one round: about a third of the tokens of up to six), for quick runs such as the demo.
    `swapped_share`: the share of pairs whose negative is swapped, the task's component and another one in each
    other's roles with the same words (the positive: the task's component at fault), in every split.
    """
    if off_task_test and heldout_split is None:
        raise ModrmError("synth: off-task test pairs need the held-out split (--holdout-phrasings)")
    unknown = [m for m in modules if m not in MODULE_KEYS]
    if unknown:
        raise ModrmError(f"synth has phrasing only for modules {', '.join(MODULE_KEYS)}; got {', '.join(unknown)}")
    if len(set(modules)) != len(modules):
        raise ModrmError(f"synth: modules listed twice: {', '.join(modules)}")
    if pairs_per_module < 0:
        raise ModrmError(f"synth: pairs_per_module must be >= 0, got {pairs_per_module}")
    if not 1 <= max_rounds <= MAX_ROUNDS:
        raise ModrmError(f"synth: max_rounds must be between 1 and {MAX_ROUNDS}, got {max_rounds}")
    if not 0.0 <= swapped_share <= 1.0:
        raise ModrmError(f"synth: swapped_share must be between 0 and 1, got {swapped_share}")
    pairs = []
    for module in modules:
        rng = random.Random(f"{seed}/{module}")
        pairs += [
            _pair(module, i, rng, heldout_split, off_task_test, max_rounds, swapped_share)
            for i in range(pairs_per_module)
        ]
    return pairs


# ---------------------------------------------------------------------------------------------- candidates

_FOREIGN_SLOTS = ("{wrong_cause}", "{wrong_fix}", "{other_c}")  # another task's content in a text


def _self_evident(variants: list[dict[str, str]]) -> bool:
    """Whether a bad kind's fault shows in the output and its own task (it names no other task's content)."""
    return not any(slot in text for variant in variants for text in variant.values() for slot in _FOREIGN_SLOTS)


_CANDIDATE_KINDS = ("good", "subtle", _BLATANT)  # a candidate task's three outputs per round and module
# Per module, the subtle kinds a candidate task draws from.
_SELF_EVIDENT = {m: [k for k, v in kinds.items() if k != _BLATANT and _self_evident(v)] for m, kinds in _BAD.items()}


@dataclass(frozen=True, slots=True)
class CandidateTask:
    """A task and its candidate outputs: candidates[round][module][k] is (kind, texts under the round keys of
    MODULE_KEYS[module]), modules in MODULE_KEYS order, kinds in shuffled order."""

    task: str
    group: str
    candidates: tuple[tuple[tuple[tuple[str, dict[str, str]], ...], ...], ...]

    def trajectory(self, picks: Sequence[int]) -> str:
        """The tagged trajectory (as synth's pairs write one) of one pick per decision, round by round, modules in
        MODULE_KEYS order."""
        rounds, modules = [], len(MODULE_KEYS)
        for r, options in enumerate(self.candidates):
            texts: dict[str, str] = {}
            for m, choices in enumerate(options):
                texts |= choices[picks[r * modules + m]][1]
            rounds.append(_ROUND.format(n=r + 1, **texts))
        return "\n".join(rounds)


def candidate_task(
    rng: random.Random, rounds: int, wording: str, keep: Callable[[str, str], bool]
) -> CandidateTask | None:
    """A task of the bank with, per round and module, three candidate outputs in shuffled order (for an RL
    environment whose modules choose among them): the good one, a subtle one and the blatant one, each in a surface
    style drawn at random, in `wording` ("train": the training variants of each phrasing list, "heldout": the last
    variant, "any"). The subtle kind is one whose fault shows in the output and its own task (a skipped check, a wrong
    tool or file, a vague reflection...), never one naming another task's cause or component. None, having drawn
    the task alone, when `keep(task, group)` is false."""
    task, slots, _ = _draw_task(rng)
    group = f"{slots['goal']} in {slots['c']}"
    if not keep(task, group):
        return None
    candidates = []
    for r in range(1, rounds + 1):
        phase = _phase(r, rounds)
        round_slots = _round_slots(slots, phase, r, rng.randint(1, 4))
        options = []
        for module in MODULE_KEYS:
            choices = [_candidate(rng, module, kind, phase, round_slots, wording) for kind in _CANDIDATE_KINDS]
            rng.shuffle(choices)
            options.append(tuple(choices))
        candidates.append(tuple(options))
    return CandidateTask(task, group, tuple(candidates))


def _candidate(rng: random.Random, module: str, kind: str, phase: str, slots: dict, wording: str) -> tuple[str, dict]:
    """(kind, texts) of a good, subtle (a kind drawn from _SELF_EVIDENT) or blatant output, in a style drawn."""
    style = rng.randrange(_STYLES)
    if kind == "good":
        return kind, _good(module, phase, style, slots, wording)
    bad = _BLATANT if kind == _BLATANT else rng.choice(_SELF_EVIDENT[module])
    return bad, _fill(_variant(_BAD[module][bad], style, wording), slots)


# ---------------------------------------------------------------------------------------------- rollouts

# The order modules speak in a round of a synthetic rollout; the executor's tool results follow as a tool message.
_SPEAKERS = ("reflection", "memory", "planner", "executor")


def _chat_content(module: str, texts: dict[str, str]) -> str:
    """A module's output as one chat message: its texts (the executor's tool results are the tool's message)."""
    keys = ("action",) if module == "executor" else MODULE_KEYS[module]
    return "\n".join(texts[key] for key in keys)


def _output(rng: random.Random, module: str, good: dict[str, str], slots: dict, other: dict, style: int) -> dict:
    """A bad output of `module` whose message differs from the good one (a failed call with the right action, for
    one, would show only in the tool's message)."""
    while True:
        kind = _draw_kind(rng, module)
        if kind == _OFF_TASK:
            phase, r = slots["phase"], int(slots["r"])
            texts = _good(module, phase, style, _round_slots(other, phase, r, int(slots["k"])), "any")
        else:
            texts = _fill(_variant(_BAD[module][kind], style, "any"), slots)
        if _chat_content(module, texts) != _chat_content(module, good):
            return texts


@dataclass(frozen=True, slots=True)
class _TaskPlan:
    """What every rollout of one task shares: the task, its rounds, and each step's good and bad outputs."""

    task: str
    group: str
    steps: list[tuple[int, str]]  # (round, module) in speaking order
    good: dict[tuple[int, str], dict[str, str]]
    draw_bad: Callable[[random.Random, tuple[int, str]], dict[str, str]]


def _task_plan(rng: random.Random, max_rounds: int) -> _TaskPlan:
    task, slots, other = _draw_task(rng)
    n = rng.randint(1, max_rounds)
    good, context = {}, {}
    for r in range(1, n + 1):
        phase, k = _phase(r, n), rng.randint(1, 4)
        round_slots = _round_slots(slots, phase, r, k) | {"phase": phase}
        for module in _SPEAKERS:
            style = rng.randrange(_STYLES)
            good[r, module] = _good(module, phase, style, round_slots, "any")
            context[r, module] = (round_slots, style)

    def draw_bad(rng: random.Random, step: tuple[int, str]) -> dict[str, str]:
        round_slots, style = context[step]
        return _output(rng, step[1], good[step], round_slots, other, style)

    steps = [(r, m) for r in range(1, n + 1) for m in _SPEAKERS]
    return _TaskPlan(task, f"{slots['goal']} in {slots['c']}", steps, good, draw_bad)


def _draw_step(rng: random.Random, plan: _TaskPlan, step: tuple[int, str]) -> tuple[bool, dict[str, str]]:
    """(good?, texts): each output is bad with a chance of one in the number of outputs (one mistake a rollout on
    average)."""
    if rng.random() < 1 / len(plan.steps):
        return False, plan.draw_bad(rng, step)
    return True, plan.good[step]


def _messages(plan: _TaskPlan, outputs: list) -> list[dict]:
    messages = []
    for (_, module), (_, texts) in zip(plan.steps, outputs, strict=True):
        messages.append({"role": "assistant", "name": module, "content": _chat_content(module, texts)})
        if module == "executor":
            messages.append({"role": "tool", "content": texts["results"]})
    return messages


def _tagged(plan: _TaskPlan, outputs: list) -> str:
    """The rollout as synth's pairs write a trajectory (so its module views look like theirs)."""
    rounds: dict[int, dict[str, str]] = defaultdict(dict)
    for (r, _), (_, texts) in zip(plan.steps, outputs, strict=True):
        rounds[r] |= texts
    return "\n".join(_ROUND.format(n=r, **texts) for r, texts in rounds.items())


def _rollout_record(plan: _TaskPlan, task_id: str, number: int, outputs: list, rng: random.Random, tagged: bool):
    """A rollout in chat form (or `tagged`, synth's trajectory text); its outcome 1 with a chance that falls with
    each bad output (0.95, 0.28, 0.09, ...); `good` is the ground truth: per module, per round, whether its output
    was good."""
    truth = defaultdict(list)
    for (_, module), (ok, _) in zip(plan.steps, outputs, strict=True):
        truth[module].append(ok)
    bad = sum(not ok for ok, _ in outputs)
    outcome = 1.0 if rng.random() < 0.02 + 0.93 * 0.28**bad else 0.0
    form = {"trajectory": _tagged(plan, outputs)} if tagged else {"messages": _messages(plan, outputs)}
    return {
        "task_id": task_id,
        "task": plan.task,
        "rollout_id": f"{task_id}/{number}",
        "outcome": outcome,
        **form,
        "group": plan.group,
        "good": dict(truth),
    }


def generate_rollouts(
    tasks: int, group_size: int, seed: int, branched: bool = False, max_rounds: int = 2, tagged: bool = False
) -> Iterator[dict]:
    """GRPO-style groups: `group_size` rollouts for each of `tasks` tasks, in chat form, whose binary outcome
    depends on how many of their modules' outputs were bad (with noise); the same for the same arguments.
    Independent rollouts draw every output afresh; `branched` ones grow a tree, as tree search does: each new
    rollout copies an earlier one up to a random step and draws the rest afresh (so rollouts share prefixes).
    `tagged`: each rollout a `trajectory` in synth's tagged text instead of chat `messages` (the draws unchanged).
    Each record's extra fields `good` (the ground truth) and `group` (synth's pair group of its task) let tests
    score what is mined from them."""
    if tasks < 1 or group_size < 1:
        raise ModrmError(f"synth: tasks and group size must be 1 or more, got {tasks} and {group_size}")
    if not 1 <= max_rounds <= MAX_ROUNDS:
        raise ModrmError(f"synth: max_rounds must be between 1 and {MAX_ROUNDS}, got {max_rounds}")
    for t in range(tasks):
        rng = random.Random(f"{seed}/rollouts/{t}")
        plan = _task_plan(rng, max_rounds)
        drawn: list[list] = []
        for g in range(group_size):
            keep = []
            if branched and drawn:
                parent = rng.choice(drawn)
                keep = parent[: rng.randrange(len(plan.steps))]
            outputs = keep + [_draw_step(rng, plan, step) for step in plan.steps[len(keep) :]]
            drawn.append(outputs)
            yield _rollout_record(plan, f"task-{t}", g, outputs, rng, tagged)


def write_rollouts(path: str | Path, rollouts: Iterable[dict]) -> int:
    """JSON lines, atomically; returns how many were written."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with tmp.open("w", encoding="utf-8") as handle:
            for rollout in rollouts:
                handle.write(json.dumps(rollout) + "\n")
                count += 1

    atomic_write(path, write)
    return count


def _reworded(pair: Pair) -> Pair:
    side = {
        s: _side(heldout_wording(getattr(pair, s).context), pair.target_module, getattr(pair, s).outcome)
        for s in ("positive", "negative")
    }
    return Pair(pair.pair_id, pair.target_module, pair.task, side["positive"], side["negative"], pair.group)


def write_pairs(path: str | Path, pairs: Sequence[Pair]) -> Path:
    """JSONL, or a JSON array when the suffix is `.json`; atomic, so a killed run never leaves half a file."""
    path = Path(path)
    as_array = path.suffix == ".json"

    def write(tmp: Path) -> None:
        records = (json.dumps(pair_to_record(pair)) for pair in pairs)  # streamed: 100k pairs are about 1 GB
        with tmp.open("w", encoding="utf-8") as handle:
            if not as_array:
                handle.writelines(record + "\n" for record in records)
                return
            handle.write("[")
            for i, record in enumerate(records):
                handle.write(("\n" if i == 0 else ",\n") + record)
            handle.write("\n]\n")

    return atomic_write(path, write)
