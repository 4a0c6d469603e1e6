"""Embed's plan against dicts: texts numbered by first appearance, rows of cached texts, each rank's share."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

import pipeline.embed
from pipeline.cache import Cache, Shard
from pipeline.config import Config
from pipeline.data import DataError, Pair, Side, load_pairs
from pipeline.distributed import Group
from pipeline.embed import ROLES, embed_files, make_plan, read_rows, scan_pairs
from pipeline.encoder import Fingerprint
from pipeline.keys import KEY, as_keys, text_hash

LIMITS = {"context": 50, "module": 20}


def _pairs(n: int, distinct: int, seed: int) -> list[Pair]:
    """Pairs whose texts repeat within and across pairs, of varied lengths."""
    rng = random.Random(seed)

    def text() -> str:
        k = rng.randrange(distinct)
        return f"text {k} " + "x" * (k % 97)

    return [
        Pair(f"p{i}", "planner", f"task {rng.randrange(5)}", Side(text(), text()), Side(text(), text()))
        for i in range(n)
    ]


def _keys(pairs: list[Pair], config: Config) -> list[tuple[str, str]]:
    return [(role, text_hash(t)) for p in pairs for role, t in zip(ROLES, config.encoder.pair_texts(p), strict=True)]


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    """A cache holding 40 of the texts (every other, from the end), and truncated where its row is odd."""
    config = Config()
    keys = list(dict.fromkeys(_keys(_pairs(300, 120, seed=0), config)))[::-2][:40]
    fingerprint = Fingerprint("synthetic", None, "0" * 64, "mean", True, "", 512, 512, 4)
    with Cache.open(tmp_path / "cache", fingerprint) as cache:
        n = len(keys)
        cache.add_shard(Shard(keys, np.full(n, 9), np.arange(n) % 2 == 1, np.zeros((n, 4), np.float16)))
        cache.commit(keys)
        return cache


@pytest.mark.parametrize(("group_appearances", "range_"), [(1 << 18, 1 << 20), (7, 16), (1, 4)])
def test_the_plan_numbers_new_texts_by_first_appearance_after_the_cached_ones(
    cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_appearances: int, range_: int
) -> None:
    """Buckets deduplicated a few at a time and rows brought back a range at a time give one dict's answer."""
    monkeypatch.setattr(pipeline.embed, "GROUP_APPEARANCES", group_appearances)
    monkeypatch.setattr(pipeline.embed, "RANGE", range_)
    config, pairs = Config(), _pairs(300, 120, seed=0)
    keys = _keys(pairs, config)
    committed = {key: row for row, key in enumerate(cache.keys())}
    new: dict[tuple[str, str], int] = {}
    for key in keys:
        if key not in committed:
            new.setdefault(key, len(new))
    pending = as_keys(list(new)[3:9])  # a killed run encoded these
    plan = make_plan(scan_pairs(pairs, config, tmp_path / "work"), cache, pending, LIMITS, Group())

    expected = [committed[k] if k in committed else cache.n_rows + new[k] for k in keys]
    assert read_rows(plan.rows).reshape(-1).tolist() == expected
    assert (np.fromfile(plan.listed, dtype=KEY) == as_keys(list(new))).all() and plan.n_listed == len(new)
    first = {}
    for at, key in enumerate(keys):
        first.setdefault(key, at)
    to_encode = sorted(first[k] for k in list(new)[:3] + list(new)[9:])
    assert [at for at in range(len(keys)) if plan.mine.nibble(at // 4) >> (at % 4) & 1] == to_encode
    assert plan.to_encode == len(to_encode) and plan.unique == len(first)
    assert plan.truncated == sum(row % 2 for key, row in committed.items() if key in first)


def test_ranks_share_the_texts_to_encode_once_balanced_by_length(cache: Cache, tmp_path: Path) -> None:
    config, pairs = Config(), _pairs(300, 120, seed=0)
    scan = scan_pairs(pairs, config, tmp_path / "work")
    alone = make_plan(scan, cache, as_keys([]), LIMITS, Group())
    plans = [make_plan(scan, cache, as_keys([]), LIMITS, Group(rank, 3)) for rank in range(3)]
    everything = [alone.mine.nibble(n) for n in range(len(pairs))]
    shares = [[plan.mine.nibble(n) for n in range(len(pairs))] for plan in plans]
    for n, wanted in enumerate(everything):
        a, b, c = (share[n] for share in shares)
        assert a | b | c == wanted and not (a & b or a & c or b & c)
    texts = [(role, t) for p in pairs for role, t in zip(ROLES, config.encoder.pair_texts(p), strict=True)]
    cost = [min(len(t) // 4 + 1, LIMITS[role]) for role, t in texts]
    costs = [sum(cost[at] for at in range(len(texts)) if share[at // 4] >> (at % 4) & 1) for share in shares]
    assert max(costs) - min(costs) <= max(LIMITS.values())
    assert all(plan.n_listed == alone.n_listed for plan in plans)


@pytest.mark.parametrize("where", ["one file", "two files", "a file twice"])
def test_embed_finds_a_pair_id_met_twice_as_loading_does(
    seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, where: str
) -> None:
    """embed checks pair_ids on disk (a bucket of id hashes at a time), not with a dict: the same error."""
    records = json.loads(seed_pairs_path.read_text())
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([*records[:10], records[3] if where == "one file" else records[10]]))
    second.write_text(json.dumps([records[11], records[7], records[12]]))
    paths = {"one file": [first], "two files": [first, second], "a file twice": [first, first]}[where]
    with pytest.raises(DataError) as expected:
        load_pairs(paths)
    with pytest.raises(DataError) as found:
        embed_files(paths, tmp_path / "cache", tiny_config, progress=False)
    assert str(found.value) == str(expected.value) and found.value.problems == expected.value.problems
    assert not (tmp_path / "cache" / "pairs.parquet").exists()


def test_ids_whose_hashes_meet_are_compared_by_id(
    seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hash shared by different ids (as 8 bytes of hash may be) is not a duplicate."""
    monkeypatch.setattr(pipeline.embed, "_id_hash", lambda pair_id: len(pair_id))
    summary = embed_files([seed_pairs_path], tmp_path / "cache", tiny_config, progress=False)
    assert summary.n_pairs == 32
