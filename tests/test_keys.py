"""Packed text keys against plain Python oracles: hex strings, tuples, a dict that numbers by first appearance."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline.keys import ROLE_NAMES, FirstSeen, as_keys, index_in, roles_of, text_hash, text_key, unpack


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


@pytest.mark.parametrize("buffer_keys", [1, 7, 64, 1 << 16])
def test_first_seen_numbers_keys_as_a_dict_by_first_appearance(buffer_keys: int) -> None:
    """Keys repeat within and across buffers; every buffer size gives the dict's numbering."""
    texts = _texts(3000, 400, seed=2)
    seen = FirstSeen(buffer_keys)
    for role, text in texts:
        seen.add(text_key(role, text), len(text))
    keys, lengths, places = seen.finish()
    numbered: dict[tuple[str, str], int] = {}
    for role, text in texts:
        numbered.setdefault((role, text), len(numbered))
    assert [tuple(row.values()) for row in unpack(keys).to_pylist()] == [(r, text_hash(t)) for r, t in numbered]
    assert lengths.tolist() == [len(t) for _, t in numbered]
    assert places.tolist() == [numbered[t] for t in texts]


def test_first_seen_of_nothing_is_empty() -> None:
    keys, lengths, places = FirstSeen().finish()
    assert len(keys) == len(lengths) == len(places) == 0


def test_index_in_finds_the_first_equal_key_or_minus_one() -> None:
    among = as_keys([(role, text_hash(text)) for role, text in _texts(300, 100, seed=3)])
    asked = as_keys([(role, text_hash(text)) for role, text in _texts(300, 150, seed=4)])
    first: dict[bytes, int] = {}
    for place, key in enumerate(among.tolist()):
        first.setdefault(key, place)
    expected = [first.get(key, -1) for key in asked.tolist()]
    assert index_in(asked, among).tolist() == expected and -1 in expected
    assert index_in(pa.chunked_array([pa.array([], pa.binary(33))]), among).tolist() == []
