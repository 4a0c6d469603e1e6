"""Preference pairs: the schema, the three readers (JSON array, JSONL, seed flat format) and validation.

A pair says: for `target_module`, the `positive` trajectory is better than the `negative` one. Each side
carries the full trajectory context and the target module's own text (the seed's `module_k_all_rounds`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ModrmError

DEFAULT_MODULES = ("reflection", "planner", "executor", "memory")
SPLITS = ("train", "val", "test")
ERROR_CHARS = 1000  # an error line's length at most: a value quoted in it (a pair_id, say) can be of any size
_SURROGATE = re.compile("[\ud800-\udfff]")
_BLANKS = re.compile(r"\s*")


@dataclass(frozen=True, slots=True)
class Side:
    context: str  # the whole trajectory (seed: trajectory_full_context)
    module_text: str  # the target module's output over all rounds (seed: module_k_all_rounds)
    outcome: float | None = None


@dataclass(frozen=True, slots=True)
class Pair:
    pair_id: str
    target_module: str
    task: str
    positive: Side
    negative: Side
    group: str | None = None  # what the split is decided by; None: the task (variants of one goal: one group)

    @property
    def split_key(self) -> str:
        return self.group if self.group is not None else self.task


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    record: str  # "record 3" or "pair_id 'planner_7'"
    field: str
    message: str

    def __str__(self) -> str:
        field = f", field '{self.field}'" if self.field else ""
        return capped(f"{self.file}: {self.record}{field}: {self.message}")


def capped(text: str, limit: int = ERROR_CHARS) -> str:
    """`text` cut to `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def lone_surrogate(text: str) -> str | None:
    """Where `text` holds half of a UTF-16 pair (JSON's "\\ud800" decodes to one), which no encoder or file can
    take: a few words saying where, else None."""
    found = None if text.isascii() else _SURROGATE.search(text)
    return None if found is None else f"holds a lone surrogate (U+{ord(found[0]):04X} at character {found.start()})"


def json_problem(err: ValueError | RecursionError) -> str:
    """What a JSON decoder's failure means, in a few words."""
    if isinstance(err, json.JSONDecodeError):
        return f"malformed JSON ({err.msg})"
    if isinstance(err, RecursionError):
        return "JSON nested too deeply to read"
    return f"unreadable JSON ({str(err).split(':')[0]})"  # an integer of over 4,300 digits, say


def failing_record(text: str, start: int) -> int:
    """The index of the first element that cannot be decoded in the JSON array that opens at text[start]."""
    decoder, index, pos = json.JSONDecoder(), 0, start + 1
    while True:
        pos = _BLANKS.match(text, pos).end()
        try:
            _, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return index
        pos = _BLANKS.match(text, pos).end() + 1  # past the comma
        index += 1


class DataError(ModrmError):
    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        more = len(problems) - 1
        tail = f" (+{more} more problems; `modrm validate --data {problems[0].file}` lists them all)" if more else ""
        super().__init__(f"{problems[0]}{tail}")


# ---------------------------------------------------------------------------------------------- reading


class UnreadableFile(ModrmError):
    """A JSON file that cannot be read at all (missing, not UTF-8): `message` says why, without the file name."""

    def __init__(self, path: Path, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True, slots=True)
class JsonRecord:
    """One record of a JSON file: its decoded value, or `problem` saying why it could not be decoded."""

    index: int  # how many records of the file were decoded before it: record numbers name what a reader kept
    line: int | None  # its line in the file; None inside a JSON array when the decoder does not say
    offset: int | None  # byte offset of its JSON line, to read it again alone; None inside a JSON array
    value: object = None
    problem: str | None = None

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line is not None else f"record {self.index}"


class JsonRecords:
    """The one JSON reader: the records of a JSON lines file, read line by line in binary (a file of any size
    never sits in memory and each record knows its byte offset), or of a JSON array, read at once. A line that
    cannot be decoded is a record with a `problem` and reading goes on; an array that cannot be decoded is one such
    record and the end. UnreadableFile when the file cannot be read. `layout` is "lines" or "array" once the
    first record is read, None for a file with no content."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.layout: str | None = None

    def __iter__(self) -> Iterator[JsonRecord]:
        try:
            with self.path.open("rb") as handle:
                yield from self._read(handle)
        except FileNotFoundError:
            raise UnreadableFile(self.path, "no such file") from None
        except OSError as err:
            raise UnreadableFile(self.path, f"cannot be read ({err.strerror or err})") from None

    def _text(self, data: bytes, offset: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UnreadableFile(self.path, f"not UTF-8 text (byte {offset + err.start})") from None

    def _read(self, handle) -> Iterator[JsonRecord]:
        offset, index = 0, 0
        for lineno, data in enumerate(handle, start=1):
            text = self._text(data, offset)
            if not text.strip():
                offset += len(data)
                continue
            if self.layout is None and text.lstrip().startswith("["):
                self.layout = "array"
                yield from self._array(text + self._text(handle.read(), offset + len(data)), lineno)
                return
            self.layout = "lines"
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as err:
                yield JsonRecord(index, lineno, offset, problem=json_problem(err))
            else:
                yield JsonRecord(index, lineno, offset, value)
                index += 1
            offset += len(data)

    @staticmethod
    def _array(text: str, first_line: int) -> Iterator[JsonRecord]:
        try:
            records = json.loads(text)
        except (ValueError, RecursionError) as err:
            line = err.lineno + first_line - 1 if isinstance(err, json.JSONDecodeError) else None
            yield JsonRecord(failing_record(text, text.index("[")), line, None, problem=json_problem(err))
            return
        for index, value in enumerate(records):
            yield JsonRecord(index, None, None, value)


def _records(path: Path, problems: list[Problem]) -> Iterator[tuple[int, object]]:
    """(index, value) of each record that decodes; a record or file that does not is a problem naming it."""
    name, reader, before = str(path), JsonRecords(path), len(problems)
    try:
        for record in reader:
            if record.problem is None:
                yield record.index, record.value
            else:
                problems.append(Problem(name, record.where, "", record.problem))
    except UnreadableFile as err:
        problems.append(Problem(name, "file", "", err.message))
    if reader.layout is None and len(problems) == before:
        problems.append(Problem(name, "file", "", "is empty"))


def _record_name(record: object, index: int) -> str:
    pair_id = record.get("pair_id") if isinstance(record, dict) else None
    return f"pair_id {pair_id!r}" if isinstance(pair_id, str) and pair_id else f"record {index}"


class _Checker:
    """Collects every problem of one record instead of stopping at the first."""

    def __init__(self, file: str, record: str):
        self.file, self.record, self.problems = file, record, []

    def fail(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.file, self.record, field, message))

    def text(self, obj: dict, key: str, prefix: str = "") -> str | None:
        value = obj.get(key)
        if key not in obj:
            self.fail(prefix + key, "missing")
        elif not isinstance(value, str):
            self.fail(prefix + key, f"must be a string, got {type(value).__name__}")
        elif not value.strip():
            self.fail(prefix + key, "is empty")
        elif surrogate := lone_surrogate(value):
            self.fail(prefix + key, f"{surrogate}, which is not text")
        else:
            return value
        return None

    def outcome(self, obj: dict, prefix: str = "") -> float | None:
        value = obj.get("outcome")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(prefix + "outcome", f"must be a finite number, got {value!r}")
            return None
        return float(value)

    def side(self, obj: dict, prefix: str) -> Side | None:
        """None on any problem: a side with a bad outcome must not count as a valid pair."""
        before = len(self.problems)
        context = self.text(obj, "trajectory_full_context", prefix)
        module_text = self.text(obj, "module_k_all_rounds", prefix)
        outcome = self.outcome(obj, prefix)
        if context is None or module_text is None or len(self.problems) > before:
            return None
        return Side(context, module_text, outcome)


def _pair_header(check: _Checker, record: dict, modules: Sequence[str]) -> tuple[str, str, str] | None:
    pair_id = check.text(record, "pair_id")
    module = check.text(record, "target_module")
    task = check.text(record, "task")
    if module is not None and modules and module not in modules:
        check.fail("target_module", f"unknown module {module!r} (configured modules: {', '.join(modules)})")
        module = None
    if "group" in record and check.text(record, "group") is None:
        return None
    if pair_id is None or module is None or task is None:
        return None
    return pair_id, module, task


def _parse_pair(check: _Checker, record: dict, modules: Sequence[str]) -> Pair | None:
    header = _pair_header(check, record, modules)
    sides = []
    for key in ("positive", "negative"):
        value = record.get(key)
        if not isinstance(value, dict):
            check.fail(key, "missing" if value is None else "must be an object")
            sides.append(None)
        else:
            sides.append(check.side(value, prefix=f"{key}."))
    if header is None or None in sides:
        return None
    return Pair(*header, *sides, group=record.get("group"))


def _join_flat(file: str, flat: list[tuple[int, dict]], modules: Sequence[str]) -> tuple[list[Pair], list[Problem]]:
    """The seed's flat format: one record per side, joined by pair_id (`is_positive` says which)."""
    by_id: dict[str, dict[bool, tuple[int, dict]]] = {}
    problems: list[Problem] = []
    for index, record in flat:
        check = _Checker(file, _record_name(record, index))
        pair_id = check.text(record, "pair_id")
        is_positive = record.get("is_positive")
        if not isinstance(is_positive, bool):
            check.fail("is_positive", "must be true or false")
        elif pair_id is not None:
            slot = by_id.setdefault(pair_id, {})
            if is_positive in slot:
                check.fail("is_positive", f"a second {'positive' if is_positive else 'negative'} side for this pair")
            slot[is_positive] = (index, record)
        problems += check.problems
    pairs = []
    for pair_id, slot in by_id.items():
        check = _Checker(file, f"pair_id {pair_id!r}")
        if len(slot) < 2:
            missing = "negative" if True in slot else "positive"
            check.fail("is_positive", f"flat record without its partner (no {missing} side)")
        else:
            pos, neg = slot[True][1], slot[False][1]
            header = _pair_header(check, pos, modules)
            for key in ("task", "target_module", "group"):
                if pos.get(key) != neg.get(key):
                    check.fail(key, "differs between the positive and negative records")
            sides = [check.side(pos, "positive."), check.side(neg, "negative.")]
            if header is not None and None not in sides and not check.problems:
                pairs.append(Pair(*header, *sides, group=pos.get("group")))
        problems += check.problems
    return pairs, problems


def iter_file(
    path: str | Path, modules: Sequence[str], problems: list[Problem], check_ids: bool = True
) -> Iterator[Pair]:
    """The valid pairs of one file in file order, as they are read; every problem found goes to `problems`.
    Flat records (one per side) wait for their partner, so their pairs come after the others. Without
    `check_ids` a pair_id seen twice is left to the caller (a set of every id costs some 100 bytes a pair)."""
    file, before, count = str(path), len(problems), 0
    flat: list[tuple[int, dict]] = []
    seen: set[str] | None = set() if check_ids else None
    for index, record in _records(Path(path), problems):
        count += 1
        if not isinstance(record, dict):
            problems.append(Problem(file, f"record {index}", "", "must be a JSON object"))
        elif "is_positive" in record:
            flat.append((index, record))
        else:
            check = _Checker(file, _record_name(record, index))
            pair = _parse_pair(check, record, modules)
            problems += check.problems
            if pair is not None:
                problems += _pair_problems(file, pair, seen)
                yield pair
    if flat:
        joined, flat_problems = _join_flat(file, flat, modules)
        problems += flat_problems
        for pair in joined:
            problems += _pair_problems(file, pair, seen)
            yield pair
    if count == 0 and len(problems) == before:  # like an empty file: `[]` would otherwise make an empty cache
        problems.append(Problem(file, "file", "", "holds no records"))


def _pair_problems(file: str, pair: Pair, seen: set[str] | None) -> list[Problem]:
    problems, where = [], f"pair_id {pair.pair_id!r}"
    if seen is not None:
        if pair.pair_id in seen:
            problems.append(duplicate_id(file, pair.pair_id, file))
        seen.add(pair.pair_id)
    if pair.positive.context == pair.negative.context and pair.positive.module_text == pair.negative.module_text:
        problems.append(Problem(file, where, "negative", "identical to the positive side"))
    return problems


def check_file(path: str | Path, modules: Sequence[str] = DEFAULT_MODULES) -> tuple[list[Pair], list[Problem]]:
    """Every pair that parses and every problem found, so `validate` can report them all at once."""
    problems: list[Problem] = []
    pairs = list(iter_file(path, modules, problems))
    return pairs, problems


def duplicate_id(file: str, pair_id: str, first_file: str) -> Problem:
    """The problem of a pair_id met a second time, in `file`; first met in `first_file`."""
    message = "duplicate pair_id" if file == first_file else f"also in {first_file}"
    return Problem(file, f"pair_id {pair_id!r}", "pair_id", message)


class PairFiles:
    """The pairs of several files, read from disk on every pass over them: `modrm embed` passes twice and never
    holds them all. A pass that met a problem raises DataError at its end, naming the first (pair_ids must be
    unique over all the files: checked here with a dict of every id, or, without `check_ids`, by the caller;
    `counts` holds the pairs each file gave on the last pass, to name a pair's file from its number)."""

    def __init__(self, paths: Sequence[str | Path], modules: Sequence[str] = DEFAULT_MODULES, check_ids: bool = True):
        self.paths, self.modules, self.check_ids = [Path(p) for p in paths], list(modules), check_ids
        self.counts: list[int] = []

    def __iter__(self) -> Iterator[Pair]:
        problems: list[Problem] = []
        owner: dict[str, str] = {}
        self.counts = []
        for path in self.paths:
            earlier = dict(owner)  # duplicates inside this file are iter_file's; a file given twice is ours
            self.counts.append(0)
            for pair in iter_file(path, self.modules, problems, self.check_ids):
                if self.check_ids:
                    if pair.pair_id in earlier:
                        problems.append(duplicate_id(str(path), pair.pair_id, earlier[pair.pair_id]))
                    owner.setdefault(pair.pair_id, str(path))
                self.counts[-1] += 1
                yield pair
        if problems:
            raise DataError(problems)


def load_pairs(paths: Sequence[str | Path], modules: Sequence[str] = DEFAULT_MODULES) -> list[Pair]:
    """All pairs of all files, or a DataError naming the first problem."""
    return list(PairFiles(paths, modules))


# ---------------------------------------------------------------------------------------------- writing


def pair_to_record(pair: Pair) -> dict:
    """The seed's pair format, so files written here load in the seed project too."""

    def side(s: Side) -> dict:
        return {"trajectory_full_context": s.context, "module_k_all_rounds": s.module_text, "outcome": s.outcome}

    record = {
        "pair_id": pair.pair_id,
        "target_module": pair.target_module,
        "task": pair.task,
        "positive": side(pair.positive),
        "negative": side(pair.negative),
    }
    return record | ({"group": pair.group} if pair.group is not None else {})


# ---------------------------------------------------------------------------------------------- splits


def file_sha256(path: str | Path) -> str:
    """A data file's identity: what a checkpoint trained on is recognised by content, wherever the file moved."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def assign_split(key: str, train_fraction: float, val_fraction: float, seed: int = 0) -> str:
    """A pure function of a pair's split key (its group, else its task), so one group never lands in two
    splits, in any file or run."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < train_fraction:
        return "train"
    return "val" if u < train_fraction + val_fraction else "test"
