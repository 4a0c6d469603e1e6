"""Records too many to hold in memory, kept on disk by part and read back a few parts at a time.

The external-memory step of `modrm embed` and of a cache commit: a part is a bucket of text keys (so one text's
appearances meet in one part) or a range of positions (so what was computed by key comes back in pair order).
Memory is one buffer of records and one group of parts, whatever the number of texts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BUFFER_RECORDS = 1 << 16  # records gathered before they are sorted by part and appended to the part files


class Spill:
    """Fixed-size records (a numpy dtype), each added with its part; read back by part, in the order added. The
    last BUFFER_RECORDS added wait in memory, so a small spill never touches the disk."""

    def __init__(self, folder: Path, dtype: np.dtype, parts: int):
        shutil.rmtree(folder, ignore_errors=True)  # a new spill: nothing of an earlier one with its name
        self.folder, self.dtype, self.parts = folder, np.dtype(dtype), parts
        self.written = np.zeros(parts, dtype=np.int64)  # records of each part in its file
        self.buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.held: tuple[np.ndarray, np.ndarray] | None = None  # the buffer by part: (bounds, records)

    def add(self, part: np.ndarray, records: np.ndarray) -> None:
        self.buffer.append((np.asarray(part, dtype=np.int64), records.astype(self.dtype, copy=False)))
        self.buffered, self.held = self.buffered + len(records), None
        if self.buffered >= BUFFER_RECORDS:
            self.flush()

    def flush(self) -> None:
        """Append what waits in memory to the part files."""
        bounds, records = self._by_part()
        self.folder.mkdir(parents=True, exist_ok=True)
        for p in np.flatnonzero(np.diff(bounds)):
            with self._path(p).open("ab") as out:
                records[bounds[p] : bounds[p + 1]].tofile(out)
        self.written += np.diff(bounds)
        self.buffer, self.buffered, self.held = [], 0, None

    def _by_part(self) -> tuple[np.ndarray, np.ndarray]:
        """The waiting records sorted by part (stably), and where each part's begin."""
        if self.held is None:
            part = np.concatenate([np.empty(0, np.int64), *(p for p, _ in self.buffer)])
            records = np.concatenate([np.empty(0, self.dtype), *(r for _, r in self.buffer)])
            order = np.argsort(part, kind="stable")
            self.held = np.searchsorted(part[order], np.arange(self.parts + 1)), records[order]
        return self.held

    @property
    def counts(self) -> np.ndarray:
        return self.written + np.diff(self._by_part()[0])

    def read(self, lo: int, hi: int | None = None) -> np.ndarray:
        """The records of parts lo .. hi - 1 (lo alone by default): each part's in the order they were added."""
        bounds, held = self._by_part()
        parts = []
        for p in range(lo, lo + 1 if hi is None else hi):
            if self.written[p]:
                parts.append(np.fromfile(self._path(p), dtype=self.dtype))
            parts.append(held[bounds[p] : bounds[p + 1]])
        return np.concatenate([np.empty(0, self.dtype), *parts])

    def groups(self, records: int) -> Iterator[tuple[int, int]]:
        """(lo, hi): consecutive parts of about `records` records together (more where one part holds more)."""
        lo, held = 0, 0
        for p, count in enumerate(self.counts.tolist()):
            held += count
            if held >= records:
                yield lo, p + 1
                lo, held = p + 1, 0
        if lo < self.parts:
            yield lo, self.parts

    def _path(self, part: int) -> Path:
        return self.folder / f"{part:06d}.bin"


def records(dtype: np.dtype, **fields: np.ndarray | int) -> np.ndarray:
    """A record array of `dtype` from its fields (an int fills its field; at least one field is an array)."""
    length = len(next(v for v in fields.values() if not isinstance(v, int)))
    out = np.empty(length, dtype=dtype)
    for name, values in fields.items():
        out[name] = values
    return out


POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.int64)


class Bits:
    """One bit per position (8 positions a byte), for the few facts kept per appearance of a text."""

    def __init__(self, n: int):
        self.bytes = np.zeros(n // 8 + 1, dtype=np.uint8)

    def set(self, positions: np.ndarray) -> None:
        np.bitwise_or.at(self.bytes, positions >> 3, (1 << (positions & 7)).astype(np.uint8))

    def nibble(self, n: int) -> int:
        """Bits 4n .. 4n + 3 (a pair's four texts), as the low bits of an int."""
        return int(self.bytes[n >> 1]) >> ((n & 1) * 4) & 15

    def count(self) -> int:
        return int(POPCOUNT[self.bytes].sum())

    def ranks(self) -> Rank:
        return Rank(self)


class Rank:
    """How many bits are set before each position: a count per byte (8 bytes per 8 positions)."""

    def __init__(self, bits: Bits):
        self.bits = bits.bytes
        self.before = np.concatenate([[0], np.cumsum(POPCOUNT[self.bits])[:-1]])

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        below = self.bits[positions >> 3] & ((1 << (positions & 7)) - 1).astype(np.uint8)
        return self.before[positions >> 3] + POPCOUNT[below]
