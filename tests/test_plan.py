"""Embed's plan against dicts: texts numbered by first appearance, rows of cached texts, each rank's share."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import Cache, Shard, pack
from pipeline.config import Config
from pipeline.data import DataError, Pair, Side, load_pairs
from pipeline.distributed import Group
from pipeline.embed import PAIR_ROLES, embed_files, make_plan, scan_pairs
from pipeline.encoder import Fingerprint

LIMITS = {"context": 50, "module": 20}


def _config() -> Config:
    config = Config()
    config.encoder.max_context_tokens, config.encoder.max_module_tokens = LIMITS["context"], LIMITS["module"]
    return config


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


def _texts(pairs: list[Pair], config: Config) -> list[tuple[str, str]]:
    return [(role, t) for p in pairs for role, t in zip(PAIR_ROLES, config.encoder.pair_texts(p), strict=True)]


def _keys(texts: list[tuple[str, str]]):
    return pack([role for role, _ in texts], [hashlib.sha256(t.encode()).hexdigest() for _, t in texts])


def _held() -> list[tuple[str, str]]:
    """40 of the texts (every other, from the end), which the cache holds in this order."""
    return list(dict.fromkeys(_texts(_pairs(300, 120, seed=0), Config())))[::-2][:40]


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    held = _held()
    fingerprint = Fingerprint("synthetic", None, "0" * 64, "mean", True, "", 512, 512, 4)
    with Cache.open(tmp_path / "cache", fingerprint) as cache:
        n = len(held)
        cache.add_shard(Shard(_keys(held), np.full(n, 9), np.zeros(n, bool), np.zeros((n, 4), np.float16)))
        cache.commit(_keys(held))
        return cache


def test_the_plan_numbers_new_texts_by_first_appearance_after_the_cached_ones(cache: Cache, tmp_path: Path) -> None:
    config, pairs = _config(), _pairs(300, 120, seed=0)
    texts = _texts(pairs, config)
    committed = {text: row for row, text in enumerate(_held())}
    new: dict[tuple[str, str], int] = {}
    for text in texts:
        if text not in committed:
            new.setdefault(text, len(new))
    pending = _keys(list(new)[3:9])  # a killed run encoded these
    plan = make_plan(scan_pairs(pairs, config, tmp_path), cache, pending, Group())
    expected = [committed[t] if t in committed else cache.n_rows + new[t] for t in texts]
    assert plan.rows.reshape(-1).tolist() == expected
    assert plan.order.equals(_keys(list(new)))
    first: dict[tuple[str, str], int] = {}
    for at, text in enumerate(texts):
        first.setdefault(text, at)
    to_encode = sorted(first[t] for t in list(new)[:3] + list(new)[9:])
    assert [at for at in range(len(texts)) if plan.mine[at // 4] >> (at % 4) & 1] == to_encode
    assert plan.to_encode == len(to_encode) and len(plan.distinct_rows) == len(first)


def test_ranks_share_the_texts_to_encode_once_balanced_by_length(cache: Cache, tmp_path: Path) -> None:
    config, pairs = _config(), _pairs(300, 120, seed=0)
    scan = scan_pairs(pairs, config, tmp_path)
    alone = make_plan(scan, cache, _keys([]), Group())
    shares = [make_plan(scan, cache, _keys([]), Group(rank, 3)).mine for rank in range(3)]
    assert (shares[0] | shares[1] | shares[2]).tolist() == alone.mine.tolist()
    assert not ((shares[0] & shares[1]) | (shares[0] & shares[2]) | (shares[1] & shares[2])).any()
    texts = _texts(pairs, config)
    cost = [min(len(t) // 4 + 1, LIMITS[role]) for role, t in texts]
    costs = [sum(cost[at] for at in range(len(texts)) if share[at // 4] >> (at % 4) & 1) for share in shares]
    assert max(costs) - min(costs) <= max(LIMITS.values())


@pytest.mark.parametrize("where", ["one file", "two files", "a file twice"])
def test_embed_finds_a_pair_id_met_twice_as_loading_does(
    seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, where: str
) -> None:
    """embed checks pair_ids from pass one's columns, not with a dict of every id: the same error."""
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
    assert not (tmp_path / "cache").exists()
