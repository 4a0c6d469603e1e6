"""Raw tagged trajectories -> per-module text views (the seed's `module_k_all_rounds`).

A trajectory is a sequence of `Round N:` lines, each followed by tagged parts such as `<plan>...</plan>`. A module
reads a few of those tags; its view is every round's parts, labelled and joined with " | " exactly as the seed
data was built, so views computed here match the seed's `module_k_all_rounds` byte for byte.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline.data import DEFAULT_MODULES
from pipeline.errors import ModrmError

# module -> {lower-case tag it reads: label put before that tag's text}. Data: a new module is one more entry.
MODULE_TAGS: dict[str, dict[str, str]] = {
    "reflection": {"reflection": ""},
    "planner": {"plan": ""},
    "executor": {"action": "Action: ", "tool results": "Result: "},
    "memory": {"memory query": "Query: ", "memory result": "Result: ", "memory store": "Store: "},
}
# Tags that only group other tags: their own text is never a module's output, they only end an unclosed tag.
CONTAINER_TAGS = frozenset({"think"})

SEPARATOR = " | "


@dataclass(slots=True)
class Round:
    """One round's tagged texts in document order, so repeated tags (two tool calls) keep their order."""

    number: int | None  # None: text before any `Round N:` line (or a trajectory without such lines)
    parts: list[tuple[str, str]] = field(default_factory=list)  # (lower-case tag, stripped text)


@dataclass(slots=True)
class Trajectory:
    """A parse that always succeeds: what could not be read cleanly is kept as well as possible and reported."""

    rounds: list[Round]
    warnings: list[str]  # tolerated problems (unclosed or stray tags), for `validate`-style reports


def _names(tags: Iterable[str]) -> str:
    """A regex alternative of tag names, longest first, any run of blanks allowed where a name has a space."""
    return "|".join(re.escape(tag).replace(r"\ ", r"[ \t]+") for tag in sorted(tags, key=len, reverse=True))


@functools.lru_cache(maxsize=8)
def _token_regex(leaves: frozenset[str]) -> re.Pattern[str]:
    """One regex for a whole leaf element, a round line, or any other known tag: a parse is one linear scan.

    A leaf's body runs up to the next known tag or round line (never across one), so an unclosed tag ends there;
    the body is written as an unrolled loop (`[^<\n]*`, then one `<` or newline that starts nothing known) so the
    regex engine, not Python, walks the text.
    """
    every, leaf = _names(leaves | CONTAINER_TAGS), _names(leaves)
    round_line = r"[^\S\n]*Round[^\S\n]+\d{1,18}[^\S\n]*:[^\S\n]*$"
    body = rf"[^<\n]*(?:(?:<(?!/?[ \t]*(?:{every})[ \t]*>)|\n(?!{round_line}))[^<\n]*)*"
    element = rf"<[ \t]*(?P<open>{leaf})[ \t]*>(?P<body>{body})(?:</[ \t]*(?P<end>{every})[ \t]*>)?"
    numbered = r"^[^\S\n]*Round[^\S\n]+(?P<number>\d{1,18})[^\S\n]*:[^\S\n]*$"
    other = rf"<(?P<slash>/?)[ \t]*(?P<tag>{every})[ \t]*>"
    return re.compile(rf"{element}|{numbered}|{other}", re.MULTILINE | re.IGNORECASE)


def _leaf_tags() -> frozenset[str]:
    """Read at every parse, so entries added to MODULE_TAGS at run time are recognised too."""
    return frozenset(tag for tags in MODULE_TAGS.values() for tag in tags) - CONTAINER_TAGS


@functools.lru_cache(maxsize=256)
def _canonical(tag: str) -> str:
    return " ".join(tag.lower().split())


def _where(current: Round) -> str:
    return f"round {current.number}" if current.number is not None else "the text before any 'Round N:' line"


def _element(text: str, match: re.Match[str], current: Round, warnings: list[str]) -> None:
    """Keep a leaf's text; an unclosed one keeps the text up to whatever cut it short, with a warning."""
    opened = _canonical(match["open"])
    current.parts.append((opened, match["body"].strip()))
    end = match["end"] and _canonical(match["end"])
    if end == opened:
        return
    if end is not None:
        cut = f"</{end}>"
    elif match.end() >= len(text):
        cut = "the end of the trajectory"
    else:
        cut = "the next tag" if text[match.end()] == "<" else "the next 'Round N:' line"
    warnings.append(f"{_where(current)}: <{opened}> is not closed; took its text up to {cut}")
    if end is not None:
        _closing(end, current, warnings)


def _closing(tag: str, current: Round, warnings: list[str]) -> None:
    """A closing tag outside its element: fine for containers like </think>, a warning for leaves."""
    if tag not in CONTAINER_TAGS:
        warnings.append(f"{_where(current)}: </{tag}> has no opening <{tag}>; ignored it")


def parse_trajectory(text: str) -> Trajectory:
    """Split `text` into rounds of tagged parts, tolerating missing, unclosed and stray tags (with warnings)."""
    if not isinstance(text, str):
        raise ModrmError(f"a trajectory must be a string, got {type(text).__name__}")
    rounds: list[Round] = []
    warnings: list[str] = []
    current = Round(None)
    for match in _token_regex(_leaf_tags()).finditer(text):
        opened = match["open"]
        if opened is not None and opened == match["end"]:  # the common, well-formed case, kept inline for speed
            current.parts.append((_canonical(opened), match["body"].strip()))
        elif opened is not None:
            _element(text, match, current, warnings)
        elif match["number"] is not None:
            if current.parts or current.number is not None:
                rounds.append(current)
            current = Round(int(match["number"]))
        elif match["slash"]:
            _closing(_canonical(match["tag"]), current, warnings)
    if current.parts or current.number is not None:
        rounds.append(current)
    if len(rounds) > 1 and rounds[0].number is None:
        warnings.append("tags before the first 'Round N:' line were kept as an unnumbered first round")
    if text.strip() and not any(r.parts for r in rounds):
        warnings.append("no known tags found (expected e.g. <plan>...</plan>)")
    return Trajectory(rounds, warnings)


def part_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) in `text` of each tagged part `parse_trajectory(text)` reads, in the same order: where a part
    sits, so what came before it (the state a module answered) can be cut from the text."""
    return [match.span() for match in _token_regex(_leaf_tags()).finditer(text) if match["open"] is not None]


def _module_tags(module: str) -> dict[str, str]:
    tags = MODULE_TAGS.get(module)
    if tags is None:
        known = ", ".join(MODULE_TAGS)
        raise ModrmError(
            f"no tag mapping for module {module!r} (known: {known}); add one to pipeline.trajectory.MODULE_TAGS"
        )
    return tags


def module_view(trajectory: Trajectory | str, module: str) -> str:
    """The module's own text over all rounds; empty tags count as absent so views never hold empty pieces."""
    tags = _module_tags(module)
    if isinstance(trajectory, str):
        trajectory = parse_trajectory(trajectory)
    return SEPARATOR.join(tags[tag] + text for r in trajectory.rounds for tag, text in r.parts if text and tag in tags)


def module_views(trajectory: Trajectory | str, modules: Iterable[str] = DEFAULT_MODULES) -> dict[str, str]:
    """Every module's view from one parse (parsing dominates the cost on large datasets)."""
    if isinstance(trajectory, str):
        trajectory = parse_trajectory(trajectory)
    return {module: module_view(trajectory, module) for module in modules}
