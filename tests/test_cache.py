"""The embedding cache: round trip, dedup, growth, fingerprints, crash resume, one writer, integrity, links."""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from random_qwen3 import build_random_qwen3

import pipeline.embed
from pipeline.cache import ROLES, ROW_COLUMNS, TEXT_SCHEMA, Cache, MappedRows, Shard, pack, text_key, unpack
from pipeline.cache import open_existing as open_cache
from pipeline.config import Config
from pipeline.data import Pair, assign_split, load_pairs, pair_to_record
from pipeline.embed import PAIR_ROLES, embed_files
from pipeline.encoder import Encoder, Fingerprint
from pipeline.errors import ModrmError
from pipeline.pairwise import split_by_group

SEED_UNIQUE_TEXTS = 98  # 63 contexts + 35 module texts for the 128 text slots of the 32 seed pairs
PAIR_COLUMNS = ("pair_id", "target_module", "task", "group", "split", *ROW_COLUMNS, "pos_outcome", "neg_outcome")
SYNTHETIC = Fingerprint("synthetic", None, "0" * 64, "mean", True, "", 512, 512, 4)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def keys(spelled: list[tuple[str, str]]) -> pa.Array:
    return pack([role for role, _ in spelled], [h for _, h in spelled])


def spelled(cache: Cache) -> list[tuple[str, str]]:
    """Every committed (role, text_hash), in row order."""
    roles, hashes = unpack(cache.keys)
    return list(zip(roles.to_pylist(), hashes.to_pylist(), strict=True))


@pytest.fixture(scope="module")
def seed_cache(tmp_path_factory: pytest.TempPathFactory, seed_pairs_path: Path, tiny_config: Config):
    """One uninterrupted run over the seed pairs: (folder, summary). Tests that write copy it first."""
    folder = tmp_path_factory.mktemp("seed_cache") / "cache"
    summary = embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    return folder, summary


def _copy(seed_cache: tuple[Path, object], tmp_path: Path) -> Path:
    return Path(shutil.copytree(seed_cache[0], tmp_path / "cache", symlinks=True))


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"  # the writer's lock file, created by the first writer
    }


def _write_pairs(path: Path, pairs: list[Pair]) -> Path:
    path.write_text(json.dumps([pair_to_record(p) for p in pairs]), encoding="utf-8")
    return path


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _second_file(seed_pairs_path: Path, tmp_path: Path, n: int = 3) -> Path:
    """`n` seed pairs whose positive module text is new: n new texts, the rest already cached."""
    changed = []
    for i, pair in enumerate(load_pairs([seed_pairs_path])[:n]):
        positive = type(pair.positive)(pair.positive.context, pair.positive.module_text + f" (v2 {i})", 1.0)
        changed.append(type(pair)(pair.pair_id + "_v2", pair.target_module, pair.task, positive, pair.negative))
    return _write_pairs(tmp_path / "second.json", changed)


def _assert_same_cache(folder: Path, reference: Path) -> None:
    """Same rows for the same texts, same pairs index; embeddings equal up to batch-composition noise."""
    assert pq.read_table(folder / "texts.parquet").equals(pq.read_table(reference / "texts.parquet"))
    assert pq.read_table(folder / "pairs.parquet").equals(pq.read_table(reference / "pairs.parquet"))
    got, want = open_cache(folder)[0].embeddings(), open_cache(reference)[0].embeddings()
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=1e-3, rtol=0)
    assert not (folder / "pending").exists()


def _assert_round_trip(folder: Path, pairs: list[Pair], config: Config) -> None:
    """Every pair's four rows hold what a fresh encode of its four texts gives (to float16 precision)."""
    cache, manifest = open_cache(folder)
    table = pq.read_table(folder / "pairs.parquet")
    assert table.column("pair_id").to_pylist() == [p.pair_id for p in pairs]
    stored = cache.embeddings()
    assert stored.dtype == np.float16 and np.isfinite(stored).all()
    encoder = Encoder.load(config.encoder)
    heads = [config.encoder.context_head(p.task) for p in pairs]
    committed = spelled(cache)
    for k, (column, role) in enumerate(zip(ROW_COLUMNS, PAIR_ROLES, strict=True)):
        texts = [config.encoder.pair_texts(p)[k] for p in pairs]
        rows = table.column(column).to_numpy()
        np.testing.assert_allclose(
            stored[rows].astype(np.float32), encoder.encode(texts, role=role, heads=heads), atol=2e-3, rtol=0
        )
        assert [committed[row] for row in rows] == [(role, sha(text)) for text in texts]
        tokens = encoder.tokenize(texts, role)
        index = cache.text_columns(rows, ["n_tokens", "truncated"])
        np.testing.assert_array_equal(index["n_tokens"], tokens.lengths)
        np.testing.assert_array_equal(index["truncated"], tokens.truncated)
    assert manifest["encoder"] == encoder.fingerprint.to_dict()


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.slow
def test_round_trip_and_the_one_line_recipes(seed_cache, seed_pairs_path: Path, tiny_config: Config) -> None:
    folder, summary = seed_cache
    _assert_round_trip(folder, load_pairs([seed_pairs_path]), tiny_config)
    texts = pd.read_parquet(folder / "texts.parquet")  # every committed text, in row order
    assert tuple(texts.columns) == tuple(TEXT_SCHEMA.names) and texts["row"].tolist() == list(range(SEED_UNIQUE_TEXTS))
    pairs = pd.read_parquet(folder / "pairs.parquet")
    assert tuple(pairs.columns) == PAIR_COLUMNS and len(pairs) == 32
    with h5py.File(folder / "embeddings" / "seg-000000.h5", "r") as f:
        ds = f["embeddings"]
        assert ds.dtype == np.float16 and ds.shape == (SEED_UNIQUE_TEXTS, 64) and ds.chunks is None
        assert ds.compression is None and ds.id.get_offset() is not None  # contiguous: memory-mappable
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["segments"] == [{"name": "seg-000000", "rows": SEED_UNIQUE_TEXTS}]
    assert {"compute_dtype", "storage_dtype", "n_texts", "n_pairs", "splits", "versions", "config"} <= set(manifest)
    assert manifest["data_sha256"] == [hashlib.sha256(seed_pairs_path.read_bytes()).hexdigest()]
    assert (manifest["n_texts"], manifest["n_pairs"], manifest["storage_dtype"]) == (SEED_UNIQUE_TEXTS, 32, "float16")
    assert manifest["encoder"]["max_context_tokens"] == 128 and manifest["config"]["encoder"]["max_module_tokens"] == 64
    split = split_by_group(pairs["task"], tiny_config.data)  # as training splits them
    assert pairs["split"].tolist() == [split[t] for t in pairs["task"]]
    assert (
        summary.splits == manifest["splits"] == {s: int((pairs["split"] == s).sum()) for s in ("train", "val", "test")}
    )
    assert summary.truncated == int(texts["truncated"].sum()) > 0


def test_the_pairs_index_splits_a_small_data_set_as_training_does(
    seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    """24 groups whose independent draws leave val empty: the index's split column gives val a group, as
    `split_by_group` does for training and eval, and the manifest counts it."""
    config = copy.deepcopy(tiny_config)
    config.data.split_seed = 5
    groups = [f"task {t}" for t in range(24)]
    assert "val" not in {assign_split(g, 0.8, 0.1, 5) for g in groups}
    pairs = [dataclasses.replace(p, group=groups[i % 24]) for i, p in enumerate(load_pairs([seed_pairs_path]))]
    summary = embed_files([_write_pairs(tmp_path / "pairs.json", pairs)], tmp_path / "cache", config, progress=False)
    index = pd.read_parquet(tmp_path / "cache" / "pairs.parquet")
    split = split_by_group(groups, config.data)
    assert index["split"].tolist() == [split[p.split_key] for p in pairs]
    assert summary.splits["val"] == int((index["split"] == "val").sum()) > 0


@pytest.mark.slow
def test_round_trip_with_minilm(
    tmp_path: Path, seed_pairs_path: Path, minilm_id: str, make_config: Callable[..., Config]
) -> None:
    pairs = load_pairs([seed_pairs_path])[::8]  # one pair per module keeps MiniLM on a CPU quick
    config = make_config(minilm_id)
    summary = embed_files([_write_pairs(tmp_path / "four.json", pairs)], tmp_path / "cache", config, progress=False)
    assert summary.n_pairs == 4 and summary.encoded == summary.unique_texts > 0
    _assert_round_trip(tmp_path / "cache", pairs, config)
    assert open_cache(tmp_path / "cache")[1]["encoder"]["dim"] == 384


def test_keys_spell_the_role_and_the_sha256_of_the_text() -> None:
    texts = [(ROLES[i % 2], f"text {i % 7}") for i in range(20)]
    packed = pa.array([text_key(role, text) for role, text in texts], pa.binary(33))
    assert keys([(role, sha(text)) for role, text in texts]).equals(packed)
    assert [tuple(map(str, pair)) for pair in zip(*unpack(packed), strict=True)] == [(r, sha(t)) for r, t in texts]
    with pytest.raises(ValueError, match="64 hex digits"):
        pack(["module"], ["xyz"])
    with pytest.raises(ValueError, match="a role is not one of"):
        pack(["critic"], [sha("a")])


# ---------------------------------------------------------------------------------------------- dedup and growth


def test_dedup_counts_and_a_second_run_changes_nothing(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    _, summary = seed_cache
    pairs = load_pairs([seed_pairs_path])
    unique = {
        (role, text) for p in pairs for role, text in zip(PAIR_ROLES, tiny_config.encoder.pair_texts(p), strict=True)
    }
    assert len(unique) == SEED_UNIQUE_TEXTS  # computed independently of the cache
    assert (summary.n_pairs, summary.unique_texts, summary.cached, summary.encoded) == (32, 98, 0, 98)
    folder = _copy(seed_cache, tmp_path)
    before = _file_hashes(folder)
    again = embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    assert (again.encoded, again.cached, again.unique_texts) == (0, SEED_UNIQUE_TEXTS, SEED_UNIQUE_TEXTS)
    assert "nothing to encode" in "\n".join(again.lines())
    after = _file_hashes(folder)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }


def test_the_flat_file_after_the_pairs_file_encodes_nothing(
    seed_cache, seed_flat_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    folder = _copy(seed_cache, tmp_path)
    before = pq.read_table(folder / "pairs.parquet")
    summary = embed_files([seed_flat_path], folder, tiny_config, progress=False)
    assert (summary.encoded, summary.cached, summary.n_pairs) == (0, SEED_UNIQUE_TEXTS, 32)
    assert pq.read_table(folder / "pairs.parquet").sort_by("pair_id").equals(before.sort_by("pair_id"))


@pytest.mark.slow
def test_growth_writes_one_new_segment_of_the_new_texts(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    folder = _copy(seed_cache, tmp_path)
    old = folder / "embeddings" / "seg-000000.h5", folder / "texts.parquet" / "seg-000000.parquet"
    before = [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in old]
    old_emb = open_cache(folder)[0].embeddings()
    second = _second_file(seed_pairs_path, tmp_path)
    summary = embed_files([seed_pairs_path, second], folder, tiny_config, progress=False)
    assert (summary.n_pairs, summary.unique_texts, summary.encoded, summary.cached) == (35, 101, 3, 98)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in old] == before  # never rewritten
    with h5py.File(folder / "embeddings" / "seg-000001.h5", "r") as f:
        assert f["embeddings"].shape == (3, 64)
    cache, manifest = open_cache(folder)
    assert cache.n_rows == manifest["n_texts"] == SEED_UNIQUE_TEXTS + 3 and len(cache.segments) == 2
    whole = cache.embeddings()
    np.testing.assert_array_equal(whole[:SEED_UNIQUE_TEXTS], old_emb)
    assert pd.read_parquet(folder / "texts.parquet")["row"].tolist() == list(range(cache.n_rows))
    mapped = cache.embeddings(memory_budget_bytes=0)
    assert isinstance(mapped, MappedRows) and isinstance(whole, np.ndarray)
    rows = np.array([SEED_UNIQUE_TEXTS + 2, 0, SEED_UNIQUE_TEXTS, 5, 5])  # across both segments, any order
    np.testing.assert_array_equal(mapped[rows], whole[rows])
    np.testing.assert_array_equal(mapped[np.arange(len(whole))], whole)
    _assert_round_trip(folder, load_pairs([seed_pairs_path, second]), tiny_config)


@pytest.mark.slow
def test_compact_merges_the_segments_into_one_and_keeps_every_row(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    """`modrm cache compact`: one segment with every row where it was; a reader that mapped the old segments
    still reads them; the cache goes on growing and finding its texts."""
    folder = _copy(seed_cache, tmp_path)
    second = _second_file(seed_pairs_path, tmp_path)
    embed_files([second], folder, tiny_config, progress=False)
    before, _ = open_cache(folder)
    emb, mapped_before = before.embeddings(), before.embeddings(memory_budget_bytes=0)
    command = [
        sys.executable,
        "-c",
        "from pipeline.cli import main; main()",
        "cache",
        "compact",
        "--cache",
        str(folder),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0 and "2 segments merged into one" in done.stdout, done.stderr
    after, manifest = open_cache(folder)
    assert [p.name for p in (folder / "embeddings").iterdir()] == ["seg-000002.h5"]
    assert [p.name for p in (folder / "texts.parquet").iterdir()] == ["seg-000002.parquet"]
    assert manifest["n_texts"] == after.n_rows and spelled(after) == spelled(before)
    np.testing.assert_array_equal(after.embeddings(), emb)
    np.testing.assert_array_equal(mapped_before[np.arange(after.n_rows)], emb)  # unlinked, still mapped
    assert pd.read_parquet(folder / "texts.parquet")["row"].tolist() == list(range(after.n_rows))
    assert embed_files([second], folder, tiny_config, progress=False).encoded == 0
    with Cache.open(folder) as cache:
        assert cache.compact() == 0  # one segment: nothing to do


def test_find_equals_a_dict_of_every_row(seed_cache) -> None:
    cache, _ = open_cache(seed_cache[0])
    index = {key: row for row, key in enumerate(spelled(cache))}
    known = list(index)
    other_role = [("context" if role == "module" else "module", h) for role, h in known[:5]]  # same hash, other role
    asked = [*known[::-1], *known[:7], *other_role, ("module", sha("never embedded"))]
    assert cache.find(keys(asked)).tolist() == [index.get(k, -1) for k in asked]
    assert cache.find(keys([])).shape == (0,)
    with pytest.raises(ModrmError, match="not an embedding cache"):
        open_cache(seed_cache[0].parent / "nothing")


def test_a_commit_takes_each_text_once_in_the_callers_order_then_the_others_as_met(tmp_path: Path) -> None:
    """Rows follow `order` (first appearance in the caller's pairs); texts no one listed (a killed run's shards for
    other data) follow in shard order; a text in two shards is committed once, its first copy."""
    key = {name: ("context" if name[0] == "c" else "module", sha(name)) for name in ("m1", "m2", "c1", "x1", "x2")}
    shards = [["x2", "m2", "c1"], ["m1", "x1", "m2"], ["x2", "x1"]]
    with Cache.open(tmp_path / "cache", SYNTHETIC) as cache:
        for number, names in enumerate(shards):
            vectors = np.arange(len(names) * 4, dtype=np.float16).reshape(-1, 4) + 100 * number
            cache.add_shard(
                Shard(keys([key[n] for n in names]), np.arange(len(names)), np.zeros(len(names), bool), vectors)
            )
        assert cache.commit(keys([key["m1"], key["c1"], key["m2"]])) == 5
        assert spelled(cache) == [key[n] for n in ("m1", "c1", "m2", "x2", "x1")]
        first_copy = {name: (s, names.index(name)) for s, names in reversed(list(enumerate(shards))) for name in names}
        vectors = np.asarray(cache.embeddings(), dtype=np.float32)
        assert [(int(v[0]) // 100, (int(v[0]) % 100) // 4) for v in vectors] == [
            first_copy[n] for n in ("m1", "c1", "m2", "x2", "x1")
        ]
    assert not (tmp_path / "cache" / "pending").exists() and open_cache(tmp_path / "cache")[0].n_rows == 5


# ---------------------------------------------------------------------------------------------- fingerprint, format


@pytest.mark.parametrize(
    ("change", "field"),
    [("other_weights", "weights_sha256"), ("max_context_tokens", "max_context_tokens"), ("minilm", "dim")],
)
def test_a_different_encoder_is_refused_and_the_cache_untouched(
    seed_cache,
    seed_pairs_path: Path,
    tiny_qwen3: Path,
    minilm_id: str,
    make_config: Callable[..., Config],
    tmp_path: Path,
    change: str,
    field: str,
) -> None:
    folder = _copy(seed_cache, tmp_path)
    (folder / "pending").mkdir()  # a pending shard folder must survive too
    (folder / "pending" / "note").write_text("x")
    before = _file_hashes(folder)
    config = {
        "other_weights": lambda: make_config(
            build_random_qwen3(tmp_path / "other", seed=1), max_context_tokens=128, max_module_tokens=64
        ),
        "max_context_tokens": lambda: make_config(tiny_qwen3, max_context_tokens=96, max_module_tokens=64),
        "minilm": lambda: make_config(minilm_id),
    }[change]()
    with pytest.raises(ModrmError, match=field) as info:
        embed_files([seed_pairs_path], folder, config, progress=False)
    assert str(folder) in str(info.value)
    assert change == "minilm" or info.value.args[0].count(" vs ") == 1  # only the one differing field is named
    assert _file_hashes(folder) == before


@pytest.mark.parametrize("layout", ["no format", "format 3", "embeddings.h5"])
def test_a_cache_of_another_format_is_refused_with_embed_again(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, layout: str
) -> None:
    folder = _copy(seed_cache, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    if layout == "embeddings.h5":  # the layout before this format, killed before its manifest
        (folder / "manifest.json").unlink()
        (folder / "embeddings.h5").write_bytes(b"\x89HDF")
    else:
        manifest.pop("format") if layout == "no format" else manifest.update(format=3)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    before = _file_hashes(folder)
    for run in (
        lambda: embed_files([seed_pairs_path], folder, tiny_config, progress=False),
        lambda: open_cache(folder),
    ):
        with pytest.raises(ModrmError, match=r"another modrm format .*embed again into a fresh folder"):
            run()
    assert _file_hashes(folder) == before


# ---------------------------------------------------------------------------------------------- two passes


@pytest.mark.slow
def test_embed_holds_one_pair_at_a_time(
    seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """embed reads JSON lines twice (keys first, then the missing texts) instead of loading every pair: while a
    shard is encoded at most the pair being read is alive, so memory does not grow with the texts."""
    records = [r | {"pair_id": "streamed-" + r["pair_id"]} for r in json.loads(seed_pairs_path.read_text())]
    path = _jsonl(tmp_path / "pairs.jsonl", records)
    monkeypatch.setattr(pipeline.embed, "SHARD_TEXTS", 8)
    add_shard, alive = Cache.add_shard, []

    def counting(*args, **kwargs):
        gc.collect()
        alive.append(sum(isinstance(o, Pair) and o.pair_id.startswith("streamed-") for o in gc.get_objects()))
        return add_shard(*args, **kwargs)

    monkeypatch.setattr(Cache, "add_shard", counting)
    summary = embed_files([path], tmp_path / "cache", tiny_config, progress=False)
    assert summary.n_pairs == 32 and summary.encoded == SEED_UNIQUE_TEXTS and len(alive) >= 12
    assert max(alive) <= 1


@pytest.mark.parametrize("edit", ["a text edited", "a pair dropped", "a pair added"])
def test_pairs_that_change_between_the_two_passes_are_an_error(
    seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str
) -> None:
    """A file rewritten while embed runs: the pass that encodes meets other texts than the pass that keyed them,
    which would put embeddings under the wrong keys. Nothing is committed."""
    records = json.loads(seed_pairs_path.read_text())
    path = _jsonl(tmp_path / "pairs.jsonl", records)
    edited = {
        "a text edited": [*records[:-1], records[-1] | {"task": records[-1]["task"] + " (edited)"}],
        "a pair dropped": records[:-1],
        "a pair added": [*records, records[0] | {"pair_id": "added"}],
    }[edit]
    scan_pairs = pipeline.embed.scan_pairs

    def scan_then_rewrite(*args):
        scan = scan_pairs(*args)
        _jsonl(path, edited)
        return scan

    monkeypatch.setattr(pipeline.embed, "scan_pairs", scan_then_rewrite)
    with pytest.raises(ModrmError, match="changed while they were being embedded"):
        embed_files([path], tmp_path / "cache", tiny_config, progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("known", [True, False])
@pytest.mark.slow
def test_a_crash_after_two_shards_resumes_to_the_same_cache(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, known: bool
) -> None:
    """The next run commits the finished shards; shards of no known run (no id.json) are encoded again."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(pipeline.embed, "SHARD_TEXTS", 10)
    add_shard, written = Cache.add_shard, []

    def crash_after_two(self: Cache, shard, rank: int = 0) -> None:
        add_shard(self, shard, rank)
        written.append(len(shard.keys))
        if len(written) == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Cache, "add_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    assert written == [10, 10] and len(list((folder / "pending").glob("shard-*.h5"))) == 2
    assert not (folder / "manifest.json").exists()
    monkeypatch.undo()
    if not known:
        (folder / "pending" / "id.json").unlink()
    summary = embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    assert (summary.encoded, summary.cached) == (SEED_UNIQUE_TEXTS - 20 * known, 20 * known)
    _assert_same_cache(folder, seed_cache[0])


@pytest.mark.slow
def test_shards_of_another_encoder_are_never_merged(
    seed_pairs_path: Path,
    tiny_qwen3: Path,
    tiny_config: Config,
    make_config: Callable[..., Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "cache"
    monkeypatch.setattr(pipeline.embed, "SHARD_TEXTS", 10)
    add_shard = Cache.add_shard

    def crash_after_one(self: Cache, shard, rank: int = 0) -> None:
        add_shard(self, shard, rank)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(Cache, "add_shard", crash_after_one)
    with pytest.raises(RuntimeError):
        embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    monkeypatch.undo()
    other = make_config(tiny_qwen3, max_context_tokens=96, max_module_tokens=64)
    summary = embed_files([seed_pairs_path], folder, other, progress=False)
    assert summary.encoded == summary.unique_texts == SEED_UNIQUE_TEXTS  # the old shard was dropped, not merged
    _assert_round_trip(folder, load_pairs([seed_pairs_path]), other)


# each step of a commit, in order (opening tidies too: the kill is at its second call), and whether the commit
# stood: a kill before the manifest leaves the old commit, after it the new one
STEPS = [("_write_segment", 1, False), ("_stage_pairs", 1, False), ("_write_manifest", 1, True), ("_tidy", 2, True)]


@pytest.mark.parametrize(("step", "call", "committed"), STEPS)
def test_a_kill_at_any_step_of_a_commit_leaves_a_readable_cache_and_resumes(
    seed_cache,
    seed_pairs_path: Path,
    tiny_config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    call: int,
    committed: bool,
) -> None:
    folder = _copy(seed_cache, tmp_path)
    second = _second_file(seed_pairs_path, tmp_path)
    original, calls = getattr(Cache, step), []

    def then_killed(self: Cache, *args: object) -> object:
        result = original(self, *args)
        calls.append(step)
        if len(calls) == call:
            raise RuntimeError("simulated kill")
        return result

    monkeypatch.setattr(Cache, step, then_killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        embed_files([second], folder, tiny_config, progress=False)
    monkeypatch.undo()
    cache, manifest = open_cache(folder)  # a reader sees the old commit or the new one, whole
    assert (cache.n_rows, manifest["n_pairs"]) == ((SEED_UNIQUE_TEXTS + 3, 3) if committed else (SEED_UNIQUE_TEXTS, 32))
    assert len(cache.read_pairs()) == manifest["n_pairs"]
    summary = embed_files([second], folder, tiny_config, progress=False)
    assert summary.encoded == 0  # the finished shard was committed, or the commit stood
    reference = _copy(seed_cache, tmp_path / "reference")
    embed_files([second], reference, tiny_config, progress=False)
    _assert_same_cache(folder, reference)
    assert sorted(_file_hashes(folder)) == sorted(_file_hashes(reference))  # what the kill left was removed


@pytest.mark.parametrize("kill_after", ["_stage_pairs", "_write_manifest"])
def test_append_killed_between_the_pairs_index_and_the_manifest_then_rerun(
    seed_cache,
    seed_pairs_path: Path,
    tiny_config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kill_after: str,
) -> None:
    """The pairs index and the manifest commit together: a kill between them leaves the old pair (the rerun then
    appends) or the new one (the rerun finds the ids indexed), and data_files always names what the index holds."""
    folder = _copy(seed_cache, tmp_path)
    second = _second_file(seed_pairs_path, tmp_path)
    original = getattr(Cache, kill_after)

    def then_killed(self: Cache, *args: object) -> object:
        original(self, *args)
        raise RuntimeError("simulated kill")

    monkeypatch.setattr(Cache, kill_after, then_killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        embed_files([second], folder, tiny_config, progress=False, append=True)
    monkeypatch.undo()
    cache, manifest = open_cache(folder)
    appended = kill_after == "_write_manifest"
    ids = cache.read_pairs(["pair_id"]).column("pair_id").to_pylist()
    assert len(ids) == manifest["n_pairs"] == 32 + 3 * appended and len(manifest["data_files"]) == 1 + appended
    if appended:
        with pytest.raises(ModrmError, match="is already in the pairs index"):
            embed_files([second], folder, tiny_config, progress=False, append=True)
    else:
        embed_files([second], folder, tiny_config, progress=False, append=True)
    cache, manifest = open_cache(folder)
    assert manifest["data_files"] == [str(seed_pairs_path), str(second)] and manifest["n_pairs"] == 35
    assert pq.read_table(folder / "pairs.parquet").num_rows == 35 and not list(folder.glob("pairs-*"))


@pytest.mark.slow
def test_kill_9_during_embed_then_resume(tmp_path: Path, seed_pairs_path: Path, tiny_qwen3: Path) -> None:
    from pipeline.config import load_config

    seed = load_pairs([seed_pairs_path])[:12]
    many = [
        type(p)(
            f"{p.pair_id}_{i}",
            p.target_module,
            p.task,
            *(type(s)(f"{s.context} #{i}", f"{s.module_text} #{i}", s.outcome) for s in (p.positive, p.negative)),
        )
        for i in range(2)
        for p in seed
    ]
    data = _write_pairs(tmp_path / "many.json", many)
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(
        f'[encoder]\nname = "{tiny_qwen3}"\ndevice = "cpu"\nmax_context_tokens = 64\nmax_module_tokens = 32\n'
    )
    folder = tmp_path / "killed"
    code = (  # small shards, and a pause after each, so the kill lands with work both done and left to do
        "import time, pipeline.embed as e, pipeline.cache as c\n"
        "e.SHARD_TEXTS = 6\n"
        "add = c.Cache.add_shard\n"
        "def slow(self, shard, rank=0):\n"
        "    add(self, shard, rank)\n"
        "    time.sleep(0.3)\n"
        "c.Cache.add_shard = slow\n"
        "from pipeline.cli import main\n"
        "main()\n"
    )
    args = ["embed", "--data", str(data), "--cache", str(folder), "--config", str(config_file), "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        first = folder / "pending" / "shard-r000-000000.h5"
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.exists(), proc.communicate(timeout=60)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    shards = len(list((folder / "pending").glob("shard-*.h5")))
    assert shards >= 1 and not (folder / "manifest.json").exists()
    config = load_config(config_file)
    resumed = embed_files([data], folder, config, progress=False)
    assert 0 < resumed.encoded < resumed.unique_texts and resumed.cached >= 6 * shards
    reference = tmp_path / "reference"
    fresh = embed_files([data], reference, config, progress=False)
    assert fresh.encoded == fresh.unique_texts == resumed.unique_texts
    _assert_same_cache(folder, reference)


def test_the_writer_removes_what_killed_writes_left(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    folder = _copy(seed_cache, tmp_path)
    (folder / "pending").mkdir()
    leftovers = [
        folder / ".pairs-new.parquet.tmp-99",
        folder / "pairs-new.parquet",
        folder / "pairs-0123.parquet",  # staged, never committed
        folder / "pending" / ".shard-r001-000000.h5.tmp-99",
        folder / "embeddings" / ".seg-000001.h5.tmp-99",
        folder / "embeddings" / "seg-000001.h5",  # written, never committed
        folder / "texts.parquet" / "seg-000001.parquet",
    ]
    for path in leftovers:
        path.write_bytes(b"half")
    assert embed_files([seed_pairs_path], folder, tiny_config, progress=False).encoded == 0
    assert not any(path.exists() for path in leftovers)
    _assert_same_cache(folder, seed_cache[0])


# ---------------------------------------------------------------------------------------------- integrity, links


def _rewrite_texts(folder: Path, edit: Callable[[pa.Table], pa.Table]) -> None:
    path = folder / "texts.parquet" / "seg-000000.parquet"
    pq.write_table(edit(pq.read_table(path)), path, write_page_checksum=True)


def _flip_a_byte_in_the_hashes(folder: Path) -> None:
    path = folder / "texts.parquet" / "seg-000000.parquet"
    data = bytearray(path.read_bytes())
    at = data.index(pq.read_table(path).column("text_hash")[5].as_py().encode())  # plain-encoded page bytes
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "a byte flipped in a key's page": (_flip_a_byte_in_the_hashes, "CRC|checksum"),
    "a text listed twice": (
        lambda c: _rewrite_texts(c, lambda t: pa.concat_tables([t.slice(0, 1), t.slice(0, 1), t.slice(2)])),
        "a text is listed twice",
    ),
    "a hash not 64 hex digits": (
        lambda c: _rewrite_texts(
            c, lambda t: t.set_column(0, "text_hash", pa.array(["not a hash", *t["text_hash"].to_pylist()[1:]]))
        ),
        "64 hex digits",
    ),
    "a role unknown": (
        lambda c: _rewrite_texts(
            c, lambda t: t.set_column(2, "role", pa.array(["critic", *t["role"].to_pylist()[1:]]))
        ),
        "a role is not one of",
    ),
    "texts short of the rows": (
        lambda c: _rewrite_texts(c, lambda t: t.slice(0, 90)),
        "texts index of 90 rows, listed 98",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_key_data_is_refused_never_committed_over(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, damage: str
) -> None:
    folder = _copy(seed_cache, tmp_path)
    make, expected = DAMAGE[damage]
    make(folder)
    before = _file_hashes(folder)
    for run in (
        lambda: embed_files([seed_pairs_path], folder, tiny_config, progress=False),
        lambda: open_cache(folder),
    ):
        with pytest.raises(ModrmError, match=rf"cache {folder} is damaged \(.*({expected})") as info:
            run()
        assert "remove it" in str(info.value)
    assert _file_hashes(folder) == before


def test_symbolic_links_in_a_cache_are_never_followed_to_write_or_delete(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.h5").write_text("keep me")
    (outside / "lockfile").write_text("keep me too")
    run = lambda folder: embed_files([seed_pairs_path], folder, tiny_config, progress=False)  # noqa: E731

    folder = _copy(seed_cache, tmp_path / "a")  # a leftover link inside embeddings/: the link goes, not its target
    (folder / "embeddings" / "seg-000009.h5").symlink_to(outside / "precious.h5")
    assert run(folder).encoded == 0
    assert (
        not (folder / "embeddings" / "seg-000009.h5").is_symlink()
        and (outside / "precious.h5").read_text() == "keep me"
    )
    for name, target in [("embeddings", outside), ("pending", outside), ("manifest.json", outside / "lockfile")]:
        folder = _copy(seed_cache, tmp_path / name)
        if (folder / name).exists():
            shutil.move(folder / name, tmp_path / name / "moved")
        (folder / name).symlink_to(target)
        with pytest.raises(ModrmError, match="is a symbolic link"):
            run(folder)
    folder = _copy(seed_cache, tmp_path / "seg")
    moved = shutil.move(folder / "embeddings" / "seg-000000.h5", outside / "seg.h5")
    (folder / "embeddings" / "seg-000000.h5").symlink_to(moved)
    with pytest.raises(ModrmError, match=r"seg-000000\.h5: is a symbolic link"):
        open_cache(folder)
    folder = _copy(seed_cache, tmp_path / "lock")
    (folder / ".lock").unlink(missing_ok=True)
    (folder / ".lock").symlink_to(outside / "lockfile")
    with pytest.raises(ModrmError, match=r"\.lock: cannot open the writer's lock"):
        run(folder)
    assert sorted(p.name for p in outside.iterdir()) == ["lockfile", "precious.h5", "seg.h5"]
    assert (outside / "lockfile").read_text() == "keep me too"


def test_a_cache_that_is_a_file_is_one_line(seed_pairs_path: Path, tiny_config: Config, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    for run in (
        lambda: embed_files([seed_pairs_path], tmp_path / "file", tiny_config, progress=False),
        lambda: open_cache(tmp_path / "file"),
    ):
        with pytest.raises(ModrmError, match="file: is a file; --cache names a folder"):
            run()


@pytest.mark.slow
def test_eval_refuses_non_finite_embeddings(stage0: Path, tmp_path: Path, fixtures_dir: Path) -> None:
    from pipeline.evaluate import evaluate

    cache = Path(shutil.copytree(stage0.parent / "cache", tmp_path / "cache"))
    with h5py.File(cache / "embeddings" / "seg-000000.h5", "r+") as f:
        f["embeddings"][3, 0] = np.nan
    with pytest.raises(ModrmError, match="non-finite values in the cache's embeddings"):
        evaluate(
            [stage0],
            fixtures_dir / "seed_training_pairs.json",
            tmp_path / "out",
            cache=cache,
            split="all",
            progress=False,
        )


# ---------------------------------------------------------------------------------------------- one writer


def _embed_args(data: Path, folder: Path, config_file: Path) -> list[str]:
    return ["embed", "--data", str(data), "--cache", str(folder), "--config", str(config_file), "--quiet"]


@pytest.fixture
def tiny_config_file(tiny_qwen3: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        f'[encoder]\nname = "{tiny_qwen3}"\ndevice = "cpu"\nmax_context_tokens = 128\nmax_module_tokens = 64\n'
    )
    return path


HOLD_LOCK = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from pipeline.cache import lock_writer\n"
    "lock = lock_writer(Path(sys.argv[1]))\n"
    "print('held', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


@pytest.mark.slow
def test_a_second_writer_fails_with_no_wait_and_otherwise_waits(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    folder = _copy(seed_cache, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _file_hashes(folder)
        with pytest.raises(ModrmError, match=rf"another modrm \(pid {holder.pid}\) is writing this cache"):
            embed_files([seed_pairs_path], folder, tiny_config, progress=False, wait=False)
        assert _file_hashes(folder) == before
        started = time.monotonic()
        embed_files([_second_file(seed_pairs_path, tmp_path)], folder, tiny_config, progress=False)
        assert time.monotonic() - started > 1.0  # it waited for the holder (3 s) to let go
        assert f"waiting for another modrm (pid {holder.pid})" in capfd.readouterr().err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_concurrent_embeds_leave_a_consistent_cache(
    seed_pairs_path: Path, tiny_config: Config, tiny_config_file: Path, tmp_path: Path
) -> None:
    pairs = load_pairs([seed_pairs_path])
    halves = _write_pairs(tmp_path / "a.json", pairs[:16]), _write_pairs(tmp_path / "b.json", pairs[16:])
    folder = tmp_path / "cache"
    command = [sys.executable, "-m", "pipeline"]
    runs = [
        subprocess.Popen([*command, *_embed_args(half, folder, tiny_config_file)], stderr=subprocess.PIPE)
        for half in halves
    ]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read().decode()[-3000:]
    cache, _ = open_cache(folder)
    assert cache.n_rows == SEED_UNIQUE_TEXTS  # every text once: the second writer found the first one's rows
    reference = tmp_path / "reference"
    embed_files([seed_pairs_path], reference, tiny_config, progress=False)
    ref_cache, _ = open_cache(reference)
    np.testing.assert_allclose(
        cache.embeddings()[cache.find(ref_cache.keys)].astype(np.float32),
        ref_cache.embeddings().astype(np.float32),
        atol=1e-3,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------------- torchrun


def _torchrun(nproc: int, *args: str, script: str | None = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node N modrm ARGS` as a user launches it (gloo on CPU)."""
    program = ["-m", "pipeline"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if script:  # torchrun runs a file; a script given inline is written next to the cache
        path = Path(args[args.index("--cache") + 1]).parent / "rank_script.py"
        path.write_text(script)
        program = [str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, *program, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


RANK_SCRIPT = """\
import os, sys, time
import pipeline.embed as e, pipeline.cache as c
e.SHARD_TEXTS = 6
add = c.Cache.add_shard
def slow(self, shard, rank=0):
    add(self, shard, rank)
    (self.folder.parent / f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(0.5)
c.Cache.add_shard = slow
from pipeline.cli import main
sys.argv[0] = "modrm"
main()
"""


@pytest.mark.slow
def test_a_rank_killed_mid_run_then_a_rerun_on_two_processes_equals_one_process(
    seed_cache, seed_pairs_path: Path, tiny_config_file: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "killed"
    run = _torchrun(2, *_embed_args(seed_pairs_path, folder, tiny_config_file), script=RANK_SCRIPT)
    try:
        pid_file = tmp_path / "rank1.pid"
        deadline = time.monotonic() + 120
        while not pid_file.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pid_file.exists(), run.communicate(timeout=60)[1].decode()[-3000:]
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode != 0 and not (folder / "manifest.json").exists()  # nothing was committed
    done = list((folder / "pending").glob("shard-r*.h5"))
    assert any("-r001-" in p.name for p in done)  # the killed rank's finished shard is kept
    with h5py.File(done[0], "r"):
        pass
    kept = sum(len(h5py.File(p, "r")["keys"]) for p in done)
    # the rerun on two processes: rank 0 alone reports, the counts summed over ranks, each text encoded once, and
    # the cache the one-process run wrote
    rerun = _torchrun(2, *_embed_args(seed_pairs_path, folder, tiny_config_file))
    out, err = (stream.decode() for stream in rerun.communicate(timeout=300))
    assert rerun.returncode == 0, err[-3000:]
    assert out.count("cache ") == 1
    assert f"already cached: {kept}" in out and f"encoded {SEED_UNIQUE_TEXTS - kept} texts" in out
    _assert_same_cache(folder, seed_cache[0])
