"""Packed text keys against plain Python oracles: hex strings, tuples, a dict."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline.keys import (
    BUCKETS,
    ROLE_NAMES,
    as_keys,
    bucket,
    index_in,
    roles_of,
    text_hash,
    text_key,
    unpack,
)


def _texts(n: int, distinct: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(rng.choice(ROLE_NAMES), f"text {rng.randrange(distinct)}") for _ in range(n)]


def test_a_packed_key_spells_the_role_and_the_sha256_hex_of_its_text() -> None:
    texts = _texts(50, 20)
    keys = np.array([text_key(role, text) for role, text in texts], dtype="V33")
    spelled = [(role, hashlib.sha256(text.encode()).hexdigest()) for role, text in texts]
    assert [tuple(row.values()) for row in unpack(keys).to_pylist()] == spelled
    assert (as_keys(spelled) == keys).all()
    assert (as_keys(unpack(keys)) == keys).all()
    assert [ROLE_NAMES[code] for code in roles_of(keys)] == [role for role, _ in texts]
    assert len(as_keys([])) == 0 and unpack(as_keys([])).num_rows == 0


def test_packed_keys_sort_as_their_spelled_tuples() -> None:
    """The cache's rows for texts no run listed are sorted by key: packed or spelled, the same order."""
    spelled = [(role, text_hash(text)) for role, text in _texts(200, 150, seed=1)]
    keys = as_keys(spelled)
    assert [tuple(row.values()) for row in unpack(np.sort(keys)).to_pylist()] == sorted(spelled)


@pytest.mark.parametrize(
    ("spelled", "message"),
    [
        ([("module", "abc")], "not 64 hex digits"),
        ([("planner", text_hash("x"))], "role is not one of"),
        ([("module", "g" * 64)], "not 64 hex digits"),
    ],
)
def test_what_is_not_a_key_is_refused(spelled: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        as_keys(spelled)


def test_buckets_follow_key_order_and_spread_evenly() -> None:
    """A commit writes the texts no run listed bucket by bucket, sorted: buckets must go in key order."""
    keys = np.sort(as_keys([(role, text_hash(text)) for role, text in _texts(20_000, 10_000, seed=5)]))
    buckets = bucket(keys)
    assert (np.diff(buckets) >= 0).all() and buckets.min() >= 0 and buckets.max() < BUCKETS
    sizes = np.bincount(buckets[np.unique(keys, return_index=True)[1]], minlength=BUCKETS)
    assert sizes.max() < 3 * sizes.mean()


def test_index_in_finds_the_first_equal_key_or_minus_one() -> None:
    among = as_keys([(role, text_hash(text)) for role, text in _texts(300, 100, seed=3)])
    asked = as_keys([(role, text_hash(text)) for role, text in _texts(300, 150, seed=4)])
    first: dict[bytes, int] = {}
    for place, key in enumerate(among.tolist()):
        first.setdefault(key, place)
    expected = [first.get(key, -1) for key in asked.tolist()]
    assert index_in(asked, among).tolist() == expected and -1 in expected
    assert index_in(pa.chunked_array([pa.array([], pa.binary(33))]), among).tolist() == []
