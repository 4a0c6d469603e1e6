"""RL rollouts -> the tagged trajectories the rest of modrm reads: the reader and the one rendering.

A rollouts file holds one rollout a record (JSON lines, or a JSON array): `task_id`, `task`, `rollout_id`
(optional), `outcome` (a number; null: the rollout is skipped) and either `trajectory` (the seed's tagged text, used
as it is) or `messages` (OpenAI's chat shape), which `render_messages` turns into tagged text. From there both forms
go through the one parser (pipeline.trajectory), so a rollout turned into pairs and the same rollout scored by
`modrm serve` (its `trajectory` being `render_messages(messages)`) give the same texts.

Rendering: an assistant message is a module's output, its module the message's `name` (or `module_field`), mapped
by `names`; it goes inside its module's first tag of MODULE_TAGS (planner: <plan>, executor: <action>, memory:
<memory query>, ...). A module that MODULE_TAGS lacks gets a tag named after it (`critic` -> <critic>), added to
MODULE_TAGS for this process. Other roles are context that belongs to no module: a line `role: content` outside
any tag. `round` is optional: without it a module that has already spoken in the current round starts the next
one. Text in a message that the parser would read as a tag or a `Round N:` line is neutralised (`<plan>` becomes
`&lt;plan>`, a `Round 2:` line `[Round 2:]`), so a message never leaks into another module's view.

Memory: `RolloutIndex` reads the files once, checking every record and keeping only where each rollout is (file,
byte offset, line, task: 32 bytes a rollout); `tasks()` then reads one task's rollouts at a time from those offsets. A
JSON array has no offsets to seek to, so its records stay in memory: use JSON lines for large inputs.
"""

from __future__ import annotations

import functools
import json
import math
import re
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from pipeline import trajectory
from pipeline.data import JsonRecords, Problem, UnreadableFile, lone_surrogate
from pipeline.errors import ModrmError

if TYPE_CHECKING:
    from tqdm.auto import tqdm

MAX_ROUND = 10**18  # the parser reads round numbers of up to 18 digits
Fail = Callable[[str, str], NoReturn]  # (field, message): raises, naming the record too
_MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ROUND_LINE = re.compile(r"^[^\S\n]*Round[^\S\n]+\d+[^\S\n]*:[^\S\n]*$", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RolloutFormat:
    """How chat messages name their module: the field holding it, and a mapping from those names to modules."""

    module_field: str = "name"
    names: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rollout:
    task_id: str
    task: str
    rollout_id: str
    outcome: float | None  # None: the rollout has no outcome (yet) and is skipped
    trajectory: str  # the tagged text: given, or rendered from messages
    where: str  # "FILE: line N" (or "record N" in a JSON array), for messages about it


def parse_module_map(text: str | None) -> dict[str, str]:
    """`NAME=MODULE,...` (the --module flag) as a dict; a malformed entry is one line naming it."""
    names: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, module = (s.strip() for s in entry.partition("="))
        if not sep or not name or not module:
            raise ModrmError(f"--module {entry!r}: expected NAME=MODULE (e.g. Planner=planner)")
        if name in names and names[name] != module:
            raise ModrmError(f"--module: {name!r} mapped twice ({names[name]!r} and {module!r})")
        names[name] = module
    return names


# ---------------------------------------------------------------------------------------------- rendering


def module_tag(module: str) -> str:
    """The tag a module's chat output goes in: its first in MODULE_TAGS, or for a module MODULE_TAGS lacks a tag
    named after it, added to MODULE_TAGS (so the parser reads it back) unless that name is already a tag."""
    tags = trajectory.MODULE_TAGS.get(module)
    if tags is not None:
        return next(iter(tags))
    tag = module.lower()
    taken = {t for tags in trajectory.MODULE_TAGS.values() for t in tags} | trajectory.CONTAINER_TAGS
    if not _MODULE_NAME.fullmatch(module) or tag in taken:
        why = f"its name is already the tag <{tag}>" if tag in taken else "its name cannot be a tag"
        raise ModrmError(
            f"module {module!r} is not in pipeline.trajectory.MODULE_TAGS and {why}: "
            "map it to another name with --module NAME=MODULE, or add it to MODULE_TAGS"
        )
    trajectory.MODULE_TAGS[module] = {tag: ""}
    return tag


def _known_tags() -> frozenset[str]:
    return frozenset(t for tags in trajectory.MODULE_TAGS.values() for t in tags) | trajectory.CONTAINER_TAGS


@functools.lru_cache(maxsize=8)
def _neutraliser(tags: frozenset[str]) -> re.Pattern[str]:
    """A `<` that opens one of `tags` (opening or closing, blanks allowed as the parser allows them)."""
    names = "|".join(re.escape(t).replace(r"\ ", r"[ \t]+") for t in sorted(tags, key=len, reverse=True))
    return re.compile(rf"<(?=/?[ \t]*(?:{names})[ \t]*>)", re.IGNORECASE)


def neutralise(text: str, pattern: re.Pattern[str] | None = None) -> str:
    """`text` with nothing the parser would take for a known tag or a round line (see the module docstring);
    `pattern`: `_neutraliser` of the tags known now, if the caller has it."""
    if "<" in text:
        text = (pattern or _neutraliser(_known_tags())).sub("&lt;", text)
    return _ROUND_LINE.sub(r"[\g<0>]", text)


def _content(message: dict) -> str | None:
    """A message's text: its content (a string, or a list of text parts), then any tool calls as `call f(args)`;
    None when the content is of no such shape."""
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
            return None
        content = "".join(p.get("text", "") for p in content)
    if content is not None and not isinstance(content, str):
        return None
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        return None
    lines = [content] if content else []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            return None
        lines.append(f"call {function.get('name', '')}({function.get('arguments', '')})")
    return "\n".join(lines)


class _Renderer:
    """Chat messages -> tagged text, round by round; a problem raises naming the message and field."""

    def __init__(self, fmt: RolloutFormat, fail: Fail):
        self.fmt, self.fail = fmt, fail
        self.lines: list[str] = []
        self.round, self.spoken = 0, set()
        self.pattern = _neutraliser(_known_tags())

    def module(self, message: dict, at: str) -> str | None:
        if message.get("role") != "assistant":
            return None
        name = message.get(self.fmt.module_field)
        if not isinstance(name, str) or not name.strip():
            self.fail(f"{at}.{self.fmt.module_field}", "an assistant message needs its module's name (a string)")
        return self.fmt.names.get(name, name)

    def next_round(self, message: dict, module: str | None, at: str) -> int | None:
        number = message.get("round")
        if number is None:
            return self.round + 1 if module is not None and (self.round == 0 or module in self.spoken) else None
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number < MAX_ROUND:
            self.fail(f"{at}.round", f"must be a whole number from 1 to {MAX_ROUND - 1}, got {number!r}")
        if number < self.round:
            self.fail(f"{at}.round", f"goes back from round {self.round} to {number}")
        return number

    def add(self, message: object, index: int) -> None:
        at = f"messages[{index}]"
        if not isinstance(message, dict):
            self.fail(at, "must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role.strip():
            self.fail(f"{at}.role", "missing or not a string")
        text = _content(message)
        if text is None:
            self.fail(f"{at}.content", "must be a string, a list of text parts, or null beside tool_calls")
        if surrogate := lone_surrogate(text):
            self.fail(f"{at}.content", f"{surrogate}, which is not text")
        module = self.module(message, at)
        number = self.next_round(message, module, at)
        if number is not None and number != self.round:
            self.lines.append(f"Round {number}:")
            self.round, self.spoken = number, set()
        if module is None:
            self.lines.append(neutralise(f"{role}: {text}", self.pattern))
            return
        new = module not in trajectory.MODULE_TAGS
        try:
            tag = module_tag(module)
        except ModrmError as err:
            self.fail(f"{at}.{self.fmt.module_field}", str(err))
        if new:  # its tag is one more that a message's text must not open
            self.pattern = _neutraliser(_known_tags())
        self.lines.append(f"<{tag}>\n{neutralise(text, self.pattern)}\n</{tag}>")
        self.spoken.add(module)


def render_messages(messages: Sequence[object], fmt: RolloutFormat | None = None, fail: Fail | None = None) -> str:
    """The tagged trajectory of chat messages: what `modrm pairs` trains on and what to send `modrm serve`.
    `fail(field, message)` raises for a malformed message (default: a ModrmError naming the field)."""

    def raise_error(field: str, message: str) -> NoReturn:
        raise ModrmError(f"field '{field}': {message}")

    renderer = _Renderer(fmt or RolloutFormat(), fail or raise_error)
    for index, message in enumerate(messages):
        renderer.add(message, index)
    return "\n".join(renderer.lines)


# ---------------------------------------------------------------------------------------------- records


def _id(value: object) -> str | None:
    """An identifier: a non-empty string, or an integer written as one."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def read_rollout(value: object, file: str, where: str, fmt: RolloutFormat) -> Rollout:
    """One record as a Rollout; a problem raises one line naming the file, the record and the field. Without a
    `rollout_id` the record is named by its place: `FILE:LINE` (`FILE#INDEX` in a JSON array)."""

    def fail(field: str, message: str) -> NoReturn:
        raise ModrmError(str(Problem(file, where, field, message)))

    if not isinstance(value, dict):
        fail("", "must be a JSON object")
    task_id = _id(value.get("task_id"))
    if task_id is None:
        fail("task_id", "missing, or not a non-empty string or an integer")
    task = value.get("task")
    if not isinstance(task, str) or not task.strip():
        fail("task", "missing, empty or not a string")
    place = f"{file}:{where.removeprefix('line ')}" if where.startswith("line ") else f"{file}#{where.split()[-1]}"
    rollout_id = _id(value.get("rollout_id", place))
    if rollout_id is None:
        fail("rollout_id", "must be a non-empty string or an integer")
    if "outcome" not in value:
        fail("outcome", "missing (a number; null marks a rollout without one, which is skipped)")
    outcome = value["outcome"]
    if outcome is not None and (isinstance(outcome, bool) or not isinstance(outcome, int | float)):
        fail("outcome", f"must be a number or null, got {outcome!r}")
    if outcome is not None and not math.isfinite(outcome):
        fail("outcome", f"must be a finite number, got {outcome!r}")
    text = _trajectory(value, fmt, fail)
    for name, checked in (("task", task), ("trajectory", text)):
        if surrogate := lone_surrogate(checked):
            fail(name, f"{surrogate}, which is not text")
    return Rollout(task_id, task, rollout_id, None if outcome is None else float(outcome), text, f"{file}: {where}")


def _trajectory(value: dict, fmt: RolloutFormat, fail: Fail) -> str:
    has_messages, has_text = "messages" in value, "trajectory" in value
    if has_messages == has_text:
        fail("messages", "give either messages or trajectory" + (", not both" if has_text else " (both missing)"))
    if has_text:
        if not isinstance(value["trajectory"], str):
            fail("trajectory", "must be a string (the tagged text)")
        return value["trajectory"]
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        fail("messages", "must be a non-empty list of chat messages")
    return render_messages(messages, fmt, fail)


# ---------------------------------------------------------------------------------------------- the index


class RolloutIndex:
    """Where every rollout of some files is, by task: pass one reads and checks every record (a problem raises
    before anything is written); `tasks()` reads the rollouts back one task at a time."""

    def __init__(self, paths: Sequence[str | Path], fmt: RolloutFormat, progress: tqdm | None = None):
        self.paths, self.fmt = [Path(p) for p in paths], fmt
        self.task_numbers: dict[str, int] = {}
        self.task_of, self.file_of, self.offset_of, self.line_of = array("q"), array("q"), array("q"), array("q")
        self.arrays: dict[int, list[object]] = {}  # a JSON array's records, by file number
        for number, path in enumerate(self.paths):
            self._index(number, path, progress)

    def __len__(self) -> int:
        return len(self.task_of)

    def _index(self, number: int, path: Path, progress: tqdm | None) -> None:
        reader, count = JsonRecords(path), 0
        try:
            for record in reader:
                if record.problem is not None:
                    raise ModrmError(str(Problem(str(path), record.where, "", record.problem)))
                rollout = read_rollout(record.value, str(path), record.where, self.fmt)
                if record.offset is None:
                    self.arrays.setdefault(number, []).append(record.value)
                task = self.task_numbers.setdefault(rollout.task_id, len(self.task_numbers))
                self.task_of.append(task)
                self.file_of.append(number)
                self.offset_of.append(record.index if record.offset is None else record.offset)
                self.line_of.append(record.line or 0)
                count += 1
                if progress is not None:
                    progress.update(1)
        except UnreadableFile as err:
            raise ModrmError(str(Problem(str(path), "file", "", err.message))) from None
        if count == 0:
            raise ModrmError(str(Problem(str(path), "file", "", "holds no rollouts")))

    def tasks(self) -> Iterator[list[Rollout]]:
        """Each task's rollouts (in file order), task by task in order of first appearance."""
        order = np.argsort(np.frombuffer(self.task_of, dtype=np.int64), kind="stable")
        tasks = np.frombuffer(self.task_of, dtype=np.int64)[order]
        bounds = np.flatnonzero(np.diff(tasks)) + 1
        handles = [path.open("rb") for path in self.paths]
        try:
            for members in np.split(order, bounds) if len(order) else []:
                yield [self._read(handles, int(i)) for i in members]
        finally:
            for handle in handles:
                handle.close()

    def _read(self, handles: list, i: int) -> Rollout:
        number, offset, path = self.file_of[i], self.offset_of[i], self.paths[self.file_of[i]]
        if number in self.arrays:
            return read_rollout(self.arrays[number][offset], str(path), f"record {offset}", self.fmt)
        handle = handles[number]
        handle.seek(offset)
        try:
            value = json.loads(handle.readline())
        except (ValueError, RecursionError):
            raise ModrmError(f"{path}: line {self.line_of[i]}: changed while modrm read the file") from None
        return read_rollout(value, str(path), f"line {self.line_of[i]}", self.fmt)
