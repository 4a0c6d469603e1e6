"""On-disk records by part, and bits with their ranks, against plain Python."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pipeline.spill
from pipeline.spill import Bits, Spill, records

RECORD = np.dtype([("value", np.int64), ("tag", "V3")])


@pytest.mark.parametrize("buffer_records", [1, 5, 1 << 16])
def test_a_spill_gives_each_part_its_records_in_the_order_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffer_records: int
) -> None:
    monkeypatch.setattr(pipeline.spill, "BUFFER_RECORDS", buffer_records)
    rng = np.random.default_rng(0)
    spill, expected = Spill(tmp_path, RECORD, 9), {p: [] for p in range(9)}
    for _ in range(20):
        n = int(rng.integers(0, 30))
        part, value = rng.integers(0, 9, n), rng.integers(0, 1000, n)
        spill.add(part, records(RECORD, value=value, tag=np.full(n, b"abc", "V3")))
        for p, v in zip(part.tolist(), value.tolist(), strict=True):
            expected[p].append(v)
    assert [spill.read(p)["value"].tolist() for p in range(9)] == [expected[p] for p in range(9)]
    assert spill.read(2, 5)["value"].tolist() == expected[2] + expected[3] + expected[4]
    assert spill.counts.tolist() == [len(expected[p]) for p in range(9)]


def test_groups_cover_the_parts_in_order_about_so_many_records_each(tmp_path: Path) -> None:
    spill = Spill(tmp_path, RECORD, 10)
    sizes = [3, 0, 5, 1, 1, 7, 0, 0, 2, 0]
    for p, size in enumerate(sizes):
        spill.add(np.full(size, p), records(RECORD, value=np.arange(size)))
    groups = list(spill.groups(4))
    assert groups == [(0, 3), (3, 6), (6, 10)]  # 8, 9, then what is left
    assert list(Spill(tmp_path / "empty", RECORD, 3).groups(4)) == [(0, 3)]


def test_bits_count_rank_and_read_a_pairs_four() -> None:
    rng = np.random.default_rng(1)
    n = 1003
    on = np.flatnonzero(rng.random(n) < 0.3)
    bits = Bits(n)
    bits.set(on)
    flags = np.zeros(n, dtype=bool)
    flags[on] = True
    assert bits.count() == len(on)
    assert (bits.ranks()(np.arange(n)) == np.cumsum(flags) - flags).all()
    assert [bits.nibble(k) for k in range(n // 4)] == [
        sum(int(flags[4 * k + j]) << j for j in range(4)) for k in range(n // 4)
    ]
