"""The embedding cache: round trip, dedup, incremental files, fingerprint checks, crash resume, memory-map."""

from __future__ import annotations

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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from random_qwen3 import build_random_qwen3

import pipeline.cache as cache_module
import pipeline.embed
from pipeline.cache import ROW_COLUMNS, SEGMENTS_KEY, TEXT_COLUMNS, Cache, MappedRows, Shard, open_existing
from pipeline.config import Config
from pipeline.data import Pair, assign_split, load_pairs, pair_to_record
from pipeline.embed import embed_files, pair_texts
from pipeline.encoder import Encoder, Fingerprint
from pipeline.errors import ModrmError
from pipeline.keys import text_hash

SEED_UNIQUE_TEXTS = 98  # 63 contexts + 35 module texts for the 128 text slots of the 32 seed pairs
PAIR_COLUMNS = ("pair_id", "target_module", "task", "group", "split", *ROW_COLUMNS, "pos_outcome", "neg_outcome")
FINGERPRINT_KEYS = {
    "name",
    "revision",
    "weights_sha256",
    "pooling",
    "normalize",
    "prompt",
    "max_context_tokens",
    "max_module_tokens",
    "dim",
}


@pytest.fixture(scope="module")
def seed_cache(tmp_path_factory: pytest.TempPathFactory, seed_pairs_path: Path, tiny_config: Config):
    """One uninterrupted run over the seed pairs: (folder, summary). Tests that write copy it first."""
    folder = tmp_path_factory.mktemp("seed_cache") / "cache"
    summary = embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    return folder, summary


def _copy(seed_cache: tuple[Path, object], tmp_path: Path) -> Path:
    return Path(shutil.copytree(seed_cache[0], tmp_path / "cache"))


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"  # the writer's lock file, created by the first writer
    }


def _write_pairs(path: Path, pairs: list[Pair]) -> Path:
    path.write_text(json.dumps([pair_to_record(p) for p in pairs]), encoding="utf-8")
    return path


def _assert_same_cache(folder: Path, reference: Path) -> None:
    """Same rows for the same texts, same pairs index; embeddings equal up to batch-composition noise."""
    texts, ref_texts = pq.read_table(folder / "texts.parquet"), pq.read_table(reference / "texts.parquet")
    assert texts.equals(ref_texts)
    assert pq.read_table(folder / "pairs.parquet").equals(pq.read_table(reference / "pairs.parquet"))
    cache, _ = open_existing(folder)
    ref_cache, _ = open_existing(reference)
    np.testing.assert_allclose(
        cache.embeddings().astype(np.float32), ref_cache.embeddings().astype(np.float32), atol=1e-3, rtol=0
    )
    assert not (folder / "pending").exists()


def _assert_round_trip(folder: Path, pairs: list[Pair], config: Config) -> None:
    """Every pair's four rows hold what a fresh encode of its four texts gives (to float16 precision)."""
    cache, manifest = open_existing(folder)
    table = pq.read_table(folder / "pairs.parquet")
    assert table.column("pair_id").to_pylist() == [p.pair_id for p in pairs]
    stored = cache.embeddings()
    assert stored.dtype == np.float16 and np.isfinite(stored).all()
    encoder = Encoder.load(config.encoder)
    heads = [config.encoder.context_head(p.task) for p in pairs]
    for column, texts in pair_texts(pairs, config.encoder).items():
        role = "context" if "ctx" in column else "module"
        rows = table.column(column).to_numpy()
        fresh = encoder.encode(texts, role=role, heads=heads)
        np.testing.assert_allclose(stored[rows].astype(np.float32), fresh, atol=2e-3, rtol=0)
        keys = cache.keys()  # in row order
        for text, row in zip(texts, rows, strict=True):
            assert keys[row] == (role, hashlib.sha256(text.encode("utf-8")).hexdigest())
        tokens = encoder.tokenize(texts, role)
        index = cache.text_columns(rows, ["n_tokens", "truncated"])
        np.testing.assert_array_equal(index["n_tokens"], tokens.lengths)
        np.testing.assert_array_equal(index["truncated"], tokens.truncated)
    assert manifest["encoder"] == encoder.fingerprint.to_dict()


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_and_file_layout(seed_cache, seed_pairs_path: Path, tiny_config: Config) -> None:
    folder, summary = seed_cache
    pairs = load_pairs([seed_pairs_path])
    _assert_round_trip(folder, pairs, tiny_config)
    assert tuple(pq.read_table(folder / "texts.parquet").schema.names) == TEXT_COLUMNS  # one table to pandas too
    assert tuple(pq.read_schema(folder / "pairs.parquet").names) == PAIR_COLUMNS
    with h5py.File(folder / "embeddings.h5", "r") as f:
        assert f["embeddings"].dtype == np.float16 and f["embeddings"].shape == (SEED_UNIQUE_TEXTS, 64)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["encoder"]) >= FINGERPRINT_KEYS
    assert {"compute_dtype", "storage_dtype", "n_texts", "n_pairs", "splits", "versions", "config"} <= set(manifest)
    assert manifest["encoder"]["max_context_tokens"] == 128 and manifest["encoder"]["pooling"] == "lasttoken"
    assert (manifest["n_texts"], manifest["n_pairs"], manifest["storage_dtype"]) == (SEED_UNIQUE_TEXTS, 32, "float16")
    assert manifest["config"]["encoder"]["max_module_tokens"] == 64
    table = pq.read_table(folder / "pairs.parquet").to_pylist()
    splits: dict[str, set[str]] = {}
    for row in table:
        d = tiny_config.data
        assert row["split"] == assign_split(row["task"], d.train_fraction, d.val_fraction, d.split_seed)
        splits.setdefault(row["task"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert summary.splits == {s: [r["split"] for r in table].count(s) for s in ("train", "val", "test")}
    assert table[0]["pos_outcome"] == 1.0 and table[0]["neg_outcome"] == 0.0
    assert 0 < summary.truncated < SEED_UNIQUE_TEXTS


def test_round_trip_with_minilm(
    tmp_path: Path, seed_pairs_path: Path, minilm_id: str, make_config: Callable[..., Config]
) -> None:
    pairs = load_pairs([seed_pairs_path])[::8]  # one pair per module keeps MiniLM on a CPU quick
    path = _write_pairs(tmp_path / "four.json", pairs)
    config = make_config(minilm_id)
    summary = embed_files([path], tmp_path / "cache", config, progress=False)
    assert summary.n_pairs == 4 and summary.encoded == summary.unique_texts > 0
    _assert_round_trip(tmp_path / "cache", pairs, config)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["encoder"]["max_context_tokens"] == 256 and manifest["encoder"]["pooling"] == "mean"
    assert manifest["encoder"]["dim"] == 384


# ---------------------------------------------------------------------------------------------- dedup


def test_dedup_counts_and_a_second_run_encodes_nothing(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    _, summary = seed_cache
    pairs = load_pairs([seed_pairs_path])
    columns = pair_texts(pairs, tiny_config.encoder)
    assert sum(len(texts) for texts in columns.values()) == 128
    unique = {("ctx" in column, text) for column, texts in columns.items() for text in texts}
    assert len(unique) == SEED_UNIQUE_TEXTS  # computed independently of the cache
    assert (summary.n_pairs, summary.unique_texts, summary.cached, summary.encoded) == (32, 98, 0, 98)
    folder = _copy(seed_cache, tmp_path)
    before = _file_hashes(folder)
    again = embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    assert (again.encoded, again.cached, again.unique_texts) == (0, again.unique_texts, SEED_UNIQUE_TEXTS)
    assert "nothing to encode" in "\n".join(again.lines())
    after = _file_hashes(folder)
    for name in ("embeddings.h5", "segments/seg-000000.h5", "texts.parquet/seg-000000.parquet", "pairs.parquet"):
        assert after[name] == before[name], name


def test_the_flat_file_after_the_pairs_file_encodes_nothing(
    seed_cache, seed_flat_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    folder = _copy(seed_cache, tmp_path)
    before = pq.read_table(folder / "pairs.parquet")
    summary = embed_files([seed_flat_path], folder, tiny_config, progress=False)
    assert (summary.encoded, summary.cached, summary.n_pairs) == (0, SEED_UNIQUE_TEXTS, 32)
    after = pq.read_table(folder / "pairs.parquet")
    assert after.sort_by("pair_id").equals(before.sort_by("pair_id"))


def test_a_second_file_encodes_only_its_new_texts(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    folder = _copy(seed_cache, tmp_path)
    old_texts = pq.read_table(folder / "texts.parquet")
    old_emb = open_existing(folder)[0].embeddings()
    changed = []
    for i, pair in enumerate(load_pairs([seed_pairs_path])[:: 32 // 3][:3]):
        positive = type(pair.positive)(pair.positive.context, pair.positive.module_text + f" (v2 {i})", 1.0)
        changed.append(type(pair)(pair.pair_id + "_v2", pair.target_module, pair.task, positive, pair.negative))
    second = _write_pairs(tmp_path / "second.json", changed)
    summary = embed_files([seed_pairs_path, second], folder, tiny_config, progress=False)
    assert (summary.n_pairs, summary.unique_texts, summary.encoded) == (35, SEED_UNIQUE_TEXTS + 3, 3)
    assert summary.cached == SEED_UNIQUE_TEXTS
    cache, manifest = open_existing(folder)
    assert cache.n_rows == manifest["n_texts"] == SEED_UNIQUE_TEXTS + 3
    assert pq.read_table(folder / "texts.parquet").slice(0, SEED_UNIQUE_TEXTS).equals(old_texts)
    np.testing.assert_array_equal(cache.embeddings()[:SEED_UNIQUE_TEXTS], old_emb)
    _assert_round_trip(folder, load_pairs([seed_pairs_path, second]), tiny_config)


# ---------------------------------------------------------------------------------------------- fingerprint


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("other_weights", "weights_sha256"),
        ("max_context_tokens", "max_context_tokens"),
        ("minilm", "dim"),
        ("older_truncation", "truncation"),
    ],
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
    config = make_config(tiny_qwen3, max_context_tokens=128, max_module_tokens=64)
    if change == "older_truncation":  # a cache from before contexts kept their task line under truncation
        manifest = json.loads((folder / "manifest.json").read_text())
        del manifest["encoder"]["truncation"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    before = _file_hashes(folder)
    if change == "other_weights":
        config = make_config(
            build_random_qwen3(tmp_path / "other", seed=1), max_context_tokens=128, max_module_tokens=64
        )
    elif change == "max_context_tokens":
        config = make_config(tiny_qwen3, max_context_tokens=96, max_module_tokens=64)
    elif change == "minilm":
        config = make_config(minilm_id)
    with pytest.raises(ModrmError, match=field) as info:
        embed_files([seed_pairs_path], folder, config, progress=False)
    assert str(folder) in str(info.value)
    if change != "minilm":
        assert info.value.args[0].count(" vs ") == 1  # only the one differing field is named
    assert _file_hashes(folder) == before


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_embed_holds_one_pair_at_a_time(
    seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """embed reads JSON lines twice (keys first, then the missing texts) instead of loading every pair: while a
    shard is encoded at most the pair being read is alive, so memory does not grow with the texts."""
    records = [r | {"pair_id": "streamed-" + r["pair_id"]} for r in json.loads(seed_pairs_path.read_text())]
    path = _jsonl(tmp_path / "pairs.jsonl", records)
    monkeypatch.setattr(pipeline.embed, "SHARD_TEXTS", 8)
    encode_shard, alive = pipeline.embed._encode_shard, []

    def counting(*args, **kwargs):
        gc.collect()
        alive.append(sum(isinstance(o, Pair) and o.pair_id.startswith("streamed-") for o in gc.get_objects()))
        return encode_shard(*args, **kwargs)

    monkeypatch.setattr(pipeline.embed, "_encode_shard", counting)
    summary = embed_files([path], tmp_path / "cache", tiny_config, progress=False)
    assert summary.n_pairs == 32 and summary.encoded == SEED_UNIQUE_TEXTS and len(alive) >= 12
    assert max(alive) <= 1


@pytest.mark.parametrize("edit", ["a text edited", "a pair dropped", "a pair added"])
def test_pairs_that_change_between_the_two_passes_are_an_error(
    seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str
) -> None:
    """A file rewritten while embed runs: the pass that encodes sees other pairs than the pass that keyed them,
    which would put embeddings under the wrong keys or leave keys without rows. Nothing is committed."""
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
    assert not (tmp_path / "cache" / "texts.parquet").exists() and not (tmp_path / "cache" / "pairs.parquet").exists()


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("known", [True, False])
def test_a_crash_after_two_shards_resumes_to_the_same_cache(
    seed_cache,
    seed_pairs_path: Path,
    tiny_config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    known: bool,
) -> None:
    """The next run commits the finished shards; shards of no known pending folder are encoded again."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(pipeline.embed, "SHARD_TEXTS", 10)
    add_shard = Cache.add_shard
    written = []

    def crash_after_two(self: Cache, shard, rank: int = 0) -> None:
        add_shard(self, shard, rank)
        written.append(len(shard.keys))
        if len(written) == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Cache, "add_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    assert written == [10, 10]
    assert len(list((folder / "pending").glob("shard-*.parquet"))) == 2
    assert not (folder / "texts.parquet").exists() and not (folder / "manifest.json").exists()
    monkeypatch.undo()
    if not known:  # as an older modrm leaves them: whether a commit took them in cannot be told
        (folder / "pending" / "id.json").unlink()
    summary = embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    assert summary.encoded == SEED_UNIQUE_TEXTS - 20 * known
    assert summary.cached == 20 * known
    _assert_same_cache(folder, seed_cache[0])


def test_a_crash_while_adding_to_an_existing_cache_keeps_it_readable(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy(seed_cache, tmp_path)
    pairs = load_pairs([seed_pairs_path])
    more = [
        type(p)(p.pair_id + "_b", p.target_module, p.task, p.positive, type(p.negative)("other " + p.task, "x", 0.0))
        for p in pairs[:12]
    ]
    second = _write_pairs(tmp_path / "more.json", more)
    monkeypatch.setattr(pipeline.embed, "SHARD_TEXTS", 4)
    add_shard = Cache.add_shard

    def crash_on_the_second(self: Cache, shard, rank: int = 0) -> None:
        if len(list((self.folder / "pending").glob("shard-*.parquet"))) == 1:
            raise RuntimeError("simulated crash")
        add_shard(self, shard, rank)

    monkeypatch.setattr(Cache, "add_shard", crash_on_the_second)
    with pytest.raises(RuntimeError):
        embed_files([second], folder, tiny_config, progress=False)
    cache, _ = open_existing(folder)  # the committed cache still reads, with all its old rows
    assert cache.n_rows == SEED_UNIQUE_TEXTS
    monkeypatch.undo()
    summary = embed_files([second], folder, tiny_config, progress=False)
    new_texts = len({p.task for p in more}) + 1  # one new context per task, and the module text "x"
    assert summary.unique_texts - summary.cached == summary.encoded == new_texts - 4  # the shard was kept
    _assert_round_trip(folder, more, tiny_config)


def test_shards_of_another_encoder_are_never_merged(
    seed_pairs_path: Path,
    tiny_qwen3: Path,
    tiny_config: Config,
    make_config: Callable[..., Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "cache"
    (folder / "pending").mkdir(parents=True)  # as a run killed right after creating it leaves it
    monkeypatch.setattr(pipeline.embed, "SHARD_TEXTS", 10)
    add_shard = Cache.add_shard

    def crash_after_one(self: Cache, shard, rank: int = 0) -> None:
        add_shard(self, shard, rank)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(Cache, "add_shard", crash_after_one)
    with pytest.raises(RuntimeError):
        embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    assert (folder / "pending" / "fingerprint.json").exists()
    monkeypatch.undo()
    other = make_config(tiny_qwen3, max_context_tokens=96, max_module_tokens=64)
    summary = embed_files([seed_pairs_path], folder, other, progress=False)
    assert summary.encoded == summary.unique_texts == SEED_UNIQUE_TEXTS  # the old shard was dropped, not merged
    _assert_round_trip(folder, load_pairs([seed_pairs_path]), other)


def test_a_kill_before_the_first_manifest_still_guards_the_rows(
    seed_pairs_path: Path,
    tiny_qwen3: Path,
    tiny_config: Config,
    make_config: Callable[..., Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "cache"

    def killed(*args: object) -> None:
        raise RuntimeError("simulated kill before the manifest")

    monkeypatch.setattr(pipeline.embed, "write_manifest", killed)
    with pytest.raises(RuntimeError):
        embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    monkeypatch.undo()
    assert (folder / "texts.parquet").exists()
    before = _file_hashes(folder)
    other = make_config(tiny_qwen3, max_context_tokens=96, max_module_tokens=64)
    with pytest.raises(ModrmError, match="max_context_tokens: 128 vs 96"):
        embed_files([seed_pairs_path], folder, other, progress=False)
    assert _file_hashes(folder) == before
    summary = embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    assert summary.encoded == 0 and (folder / "manifest.json").exists()


def _many_pairs(seed_pairs_path: Path) -> list[Pair]:
    """About a hundred unique texts: synthetic pairs, or seed pairs made unique by suffixes without synth."""
    try:
        from pipeline.synth import generate_pairs
    except ImportError:  # pragma: no cover - synth is another part of the project
        seed = load_pairs([seed_pairs_path])[:12]
        return [
            type(p)(
                f"{p.pair_id}_{i}",
                p.target_module,
                p.task,
                *(type(s)(f"{s.context} #{i}", f"{s.module_text} #{i}", s.outcome) for s in (p.positive, p.negative)),
            )
            for i in range(2)
            for p in seed
        ]
    return generate_pairs(6, seed=3)


def test_kill_9_during_embed_then_resume(tmp_path: Path, seed_pairs_path: Path, tiny_qwen3: Path) -> None:
    from pipeline.config import load_config

    data = _write_pairs(tmp_path / "many.json", _many_pairs(seed_pairs_path))
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(
        f'[encoder]\nname = "{tiny_qwen3}"\ndevice = "cpu"\nmax_context_tokens = 64\nmax_module_tokens = 32\n'
    )
    folder = tmp_path / "killed"
    # small shards, and a pause after each, so the kill lands with work both done and left to do
    code = (
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        first = folder / "pending" / "shard-r000-000000.parquet"
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.exists(), proc.communicate(timeout=60)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    shards = len(list((folder / "pending").glob("shard-*.parquet")))
    assert shards >= 1 and not (folder / "manifest.json").exists()
    config = load_config(config_file)
    resumed = embed_files([data], folder, config, progress=False)
    assert 0 < resumed.encoded < resumed.unique_texts
    assert resumed.cached >= 6 * shards
    reference = tmp_path / "reference"
    fresh = embed_files([data], reference, config, progress=False)
    assert fresh.encoded == fresh.unique_texts == resumed.unique_texts
    _assert_same_cache(folder, reference)


# ---------------------------------------------------------------------------------------------- reading


def test_memory_mapped_read_equals_the_in_memory_read(seed_cache) -> None:
    cache, _ = open_existing(seed_cache[0])
    in_memory = cache.embeddings()
    mapped = cache.embeddings(memory_budget_bytes=0)
    assert isinstance(mapped, MappedRows) and isinstance(in_memory, np.ndarray)
    assert mapped.shape == in_memory.shape == (SEED_UNIQUE_TEXTS, 64) and mapped.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(mapped), in_memory)


def test_unknown_texts_and_missing_files_are_clear_errors(seed_cache, tmp_path: Path) -> None:
    cache, _ = open_existing(seed_cache[0])
    with pytest.raises(ModrmError, match="not in the cache"):
        cache.rows([("module", text_hash("never embedded"))])
    with pytest.raises(ModrmError, match="not an embedding cache"):
        open_existing(tmp_path)


# ---------------------------------------------------------------------------------------------- growth in O(new)


def _second_file(seed_pairs_path: Path, tmp_path: Path, n: int = 3) -> Path:
    """`n` seed pairs whose positive module text is new: n new texts, the rest already cached."""
    changed = []
    for i, pair in enumerate(load_pairs([seed_pairs_path])[:n]):
        positive = type(pair.positive)(pair.positive.context, pair.positive.module_text + f" (v2 {i})", 1.0)
        changed.append(type(pair)(pair.pair_id + "_v2", pair.target_module, pair.task, positive, pair.negative))
    return _write_pairs(tmp_path / "second.json", changed)


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def test_growth_writes_only_the_new_rows(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    folder = _copy(seed_cache, tmp_path)
    old_segment = folder / "segments" / "seg-000000.h5"
    before = _stat(old_segment), hashlib.sha256(old_segment.read_bytes()).hexdigest()
    old_emb = open_existing(folder)[0].embeddings()
    summary = embed_files([_second_file(seed_pairs_path, tmp_path)], folder, tiny_config, progress=False)
    assert summary.encoded == 3
    assert (_stat(old_segment), hashlib.sha256(old_segment.read_bytes()).hexdigest()) == before  # never rewritten
    with h5py.File(folder / "segments" / "seg-000001.h5", "r") as f:
        assert f["embeddings"].shape == (3, 64)  # the new segment holds the new rows only
    cache, manifest = open_existing(folder)
    assert cache.n_rows == manifest["n_texts"] == SEED_UNIQUE_TEXTS + 3
    whole = cache.embeddings()
    np.testing.assert_array_equal(whole[:SEED_UNIQUE_TEXTS], old_emb)
    with h5py.File(folder / "embeddings.h5", "r") as f:  # the contract: one dataset, as h5py reads it
        assert f["embeddings"].dtype == np.float16 and f["embeddings"].shape == (SEED_UNIQUE_TEXTS + 3, 64)
        np.testing.assert_array_equal(f["embeddings"][:], whole)
    texts = pq.read_table(folder / "texts.parquet").to_pandas()  # one table to pyarrow and pandas
    assert list(texts.columns) == list(TEXT_COLUMNS) and texts["row"].tolist() == list(range(cache.n_rows))
    mapped = cache.embeddings(memory_budget_bytes=0)
    rows = np.array([SEED_UNIQUE_TEXTS + 2, 0, SEED_UNIQUE_TEXTS, 5, 5])  # across both segments, any order
    np.testing.assert_array_equal(mapped[rows], whole[rows])


def test_compact_merges_the_segments_into_one_and_keeps_every_row(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    """`modrm cache compact`: one segment with every row where they were; a reader that mapped the old segments
    still reads them; the cache goes on growing and finding its texts."""
    folder = _copy(seed_cache, tmp_path)
    second = _second_file(seed_pairs_path, tmp_path)
    embed_files([second], folder, tiny_config, progress=False)
    before, _ = open_existing(folder)
    emb, keys, mapped_before = before.embeddings(), before.keys(), before.embeddings(memory_budget_bytes=0)
    assert len(before.segments) == 2
    _assert_find_equals_a_dict_of_every_row(before)
    done = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "cache", "compact", "--cache", str(folder)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "2 segments merged into one" in done.stdout, done.stderr
    after, manifest = open_existing(folder)
    assert sorted(p.name for p in (folder / "segments").iterdir()) == [
        "seg-000002.h5",
        "seg-000002.keyrows.npy",
        "seg-000002.keys.npy",
        "seg-000002.parquet",
    ]
    assert manifest["n_texts"] == after.n_rows == len(keys) and after.keys() == keys
    np.testing.assert_array_equal(after.embeddings(), emb)
    np.testing.assert_array_equal(after.embeddings(memory_budget_bytes=0)[np.arange(after.n_rows)], emb)
    np.testing.assert_array_equal(mapped_before[np.arange(after.n_rows)], emb)  # unlinked, still mapped
    assert (after.find(keys)["row"] == np.arange(len(keys))).all()
    _assert_find_equals_a_dict_of_every_row(after)
    with h5py.File(folder / "embeddings.h5", "r") as f:
        np.testing.assert_array_equal(f["embeddings"][:], emb)
    assert [p.name for p in (folder / "texts.parquet").iterdir()] == ["seg-000002.parquet"]
    assert pq.read_table(folder / "texts.parquet")["row"].to_pylist() == list(range(after.n_rows))
    assert embed_files([second], folder, tiny_config, progress=False).encoded == 0
    with Cache.open(folder, after.fingerprint) as cache:
        assert cache.compact() == 0  # one segment: nothing to do


def _as_old_single_file_cache(folder: Path) -> None:
    """Rewrite a cache in the layout from before segments: one contiguous embeddings.h5, a texts.parquet file."""
    cache, _ = open_existing(folder)
    emb, texts = cache.embeddings(), pq.read_table(folder / "texts.parquet")
    metadata = {b"modrm_fingerprint": json.dumps(cache.fingerprint.to_dict()).encode()}
    shutil.rmtree(folder / "segments")
    shutil.rmtree(folder / "texts.parquet")
    (folder / "embeddings.h5").unlink()
    with h5py.File(folder / "embeddings.h5", "w") as f:
        f.create_dataset("embeddings", data=emb)
    pq.write_table(texts.replace_schema_metadata(metadata), folder / "texts.parquet")


def test_an_old_single_file_cache_opens_and_grows_without_a_copy(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    folder = _copy(seed_cache, tmp_path)
    _as_old_single_file_cache(folder)
    old_emb = open_existing(folder)[0].embeddings()
    assert isinstance(open_existing(folder)[0].embeddings(0), MappedRows)
    _assert_find_equals_a_dict_of_every_row(open_existing(folder)[0])  # its keys sorted in memory
    inode = (folder / "embeddings.h5").stat().st_ino
    second = _second_file(seed_pairs_path, tmp_path)
    assert embed_files([second], folder, tiny_config, progress=False).encoded == 3
    assert (folder / "segments" / "seg-000000.h5").stat().st_ino == inode  # the old file, linked, not copied
    cache, _ = open_existing(folder)
    np.testing.assert_array_equal(cache.embeddings()[:SEED_UNIQUE_TEXTS], old_emb)
    assert (folder / "texts.parquet").is_dir() and pq.read_table(folder / "texts.parquet").num_rows == cache.n_rows
    assert (folder / "segments" / "seg-000000.keys.npy").is_file()
    _assert_find_equals_a_dict_of_every_row(cache)
    _assert_round_trip(folder, load_pairs([second]), tiny_config)


@pytest.mark.parametrize("index_rows", [cache_module.INDEX_ROWS, 7])
def test_segments_of_an_older_modrm_get_their_sorted_keys_from_the_next_writer(
    seed_pairs_path: Path, tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index_rows: int
) -> None:
    """A segment listed without sorted keys (an older modrm's) is sorted in memory by a reader, which writes nothing;
    the next writer writes its files, the very bytes a commit writes. At 7 rows a row group, the keys are sorted
    a few buckets at a time and the index is read across row groups."""
    monkeypatch.setattr(cache_module, "INDEX_ROWS", index_rows)
    folder = tmp_path / "cache"
    embed_files([seed_pairs_path], folder, tiny_config, progress=False)
    embed_files([_second_file(seed_pairs_path, tmp_path)], folder, tiny_config, progress=False)
    sorted_files = sorted((folder / "segments").glob("*.npy"))
    assert len(sorted_files) == 4
    written = {path: path.read_bytes() for path in sorted_files}
    for path in sorted_files:
        path.unlink()
    with h5py.File(folder / "embeddings.h5", "r+") as f:  # and the list as an older modrm wrote it
        f.attrs[SEGMENTS_KEY] = json.dumps([entry[:2] for entry in json.loads(f.attrs[SEGMENTS_KEY])])
    reader, _ = open_existing(folder)
    _assert_find_equals_a_dict_of_every_row(reader)
    assert not any(path.exists() for path in sorted_files)
    with Cache.open(folder, reader.fingerprint) as writer:
        assert {path: path.read_bytes() for path in sorted_files} == written
        _assert_find_equals_a_dict_of_every_row(writer)
    keys = reader.keys()

    def not_read(self: Cache, segment: object) -> None:
        raise AssertionError("the texts index was read")

    monkeypatch.setattr(Cache, "_read_index", not_read)  # from now on, opening and finding search the sorted keys
    with Cache.open(folder, reader.fingerprint) as writer:
        assert writer.find(keys)["row"].tolist() == list(range(len(keys)))
    assert open_existing(folder)[0].find(keys[::-1])["row"].tolist() == list(range(len(keys)))[::-1]


def test_a_writer_refuses_an_older_modrms_segment_whose_index_is_damaged(seed_cache, tmp_path: Path) -> None:
    """Without sorted keys or a recorded size, the damage shows when the writer sorts the index's keys."""
    folder = _copy(seed_cache, tmp_path)
    for path in (folder / "segments").glob("*.npy"):
        path.unlink()
    with h5py.File(folder / "embeddings.h5", "r+") as f:
        f.attrs[SEGMENTS_KEY] = json.dumps([entry[:2] for entry in json.loads(f.attrs[SEGMENTS_KEY])])
    index = folder / "segments" / "seg-000000.parquet"
    table = pq.read_table(index)
    pq.write_table(
        table.set_column(0, "text_hash", pa.array(["not a hash", *table["text_hash"].to_pylist()[1:]])), index
    )
    with pytest.raises(ModrmError, match=r"the texts index is unreadable \(a text_hash is not 64 hex digits\)"):
        Cache.open(folder, open_existing(folder)[0].fingerprint)
    assert not list((folder / "segments").glob("*.npy"))


# each step of a commit, in order (opening a cache publishes the texts view too: the kill is at its second call)
@pytest.mark.parametrize(("step", "call"), [("_write_segment", 1), ("_write_commit", 1), ("_publish_texts_view", 2)])
def test_a_kill_at_any_step_of_a_commit_leaves_a_readable_cache_and_resumes(
    seed_cache,
    seed_pairs_path: Path,
    tiny_config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    call: int,
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
    committed = step != "_write_segment"  # embeddings.h5, written by _write_commit, is the commit point
    cache, _ = open_existing(folder)
    assert cache.n_rows == SEED_UNIQUE_TEXTS + 3 * committed
    summary = embed_files([second], folder, tiny_config, progress=False)
    assert summary.encoded == 0  # the finished shard was committed, or the commit stood
    reference = _copy(seed_cache, tmp_path / "reference")
    embed_files([second], reference, tiny_config, progress=False)
    _assert_same_cache(folder, reference)
    assert sorted(p.name for p in (folder / "segments").iterdir()) == sorted(
        p.name for p in (reference / "segments").iterdir()
    )  # what the killed run left uncommitted was removed


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
    "from pipeline.cache import WriterLock\n"
    "lock = WriterLock(Path(sys.argv[1]))\n"
    "print('held', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


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
    cache, _ = open_existing(folder)
    assert cache.n_rows == SEED_UNIQUE_TEXTS  # every text once: the second writer found the first one's rows
    reference = tmp_path / "reference"
    embed_files([seed_pairs_path], reference, tiny_config, progress=False)
    ref_cache, _ = open_existing(reference)
    keys = ref_cache.keys()
    np.testing.assert_allclose(
        cache.embeddings()[cache.rows(keys)].astype(np.float32),
        ref_cache.embeddings().astype(np.float32),
        atol=1e-3,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------------- torchrun


def _torchrun(nproc: int, *args: str, script: str | None = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node N modrm ARGS` as a user launches it (gloo on CPU)."""
    program = ["-c", script] if script else ["-m", "pipeline"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if script:  # torchrun runs a file; a script given inline is written next to the cache
        path = Path(args[args.index("--cache") + 1]).parent / "rank_script.py"
        path.write_text(script)
        program = [str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, *program, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sharded_embed_on_two_processes_equals_one_process(
    seed_cache, seed_pairs_path: Path, tiny_config_file: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "sharded"
    run = _torchrun(2, *_embed_args(seed_pairs_path, folder, tiny_config_file))
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err.decode()[-3000:]
    assert out.decode().count("cache ") == 1  # rank 0 alone reports
    assert f"encoded {SEED_UNIQUE_TEXTS} texts" in out.decode()  # summed over ranks: each text encoded once
    _assert_same_cache(folder, seed_cache[0])


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


def test_a_rank_killed_mid_run_then_a_rerun_equals_the_uninterrupted_run(
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
    assert run.returncode != 0 and not (folder / "embeddings.h5").exists()  # nothing was committed
    done = list((folder / "pending").glob("shard-r*.parquet"))
    assert any("-r001-" in p.name for p in done)  # the killed rank's finished shard is kept
    kept = sum(pq.read_metadata(p).num_rows for p in done)
    rerun = _torchrun(2, *_embed_args(seed_pairs_path, folder, tiny_config_file))
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-3000:]
    assert f"already cached: {kept}" in out.decode() and f"encoded {SEED_UNIQUE_TEXTS - kept} texts" in out.decode()
    _assert_same_cache(folder, seed_cache[0])


def test_the_writer_removes_what_killed_writes_left(
    seed_cache, seed_pairs_path: Path, tiny_config: Config, tmp_path: Path
) -> None:
    folder = _copy(seed_cache, tmp_path)
    (folder / "pending").mkdir()
    leftovers = [
        folder / ".pairs.parquet.tmp-99",
        folder / "pending" / ".shard-r001-000000.npy.tmp-99",
        folder / "segments" / ".seg-000001.h5.tmp-99",
        folder / "segments" / "seg-000001.h5",  # written, never committed
    ]
    for path in leftovers:
        path.write_bytes(b"half")
    assert embed_files([seed_pairs_path], folder, tiny_config, progress=False).encoded == 0
    assert not any(path.exists() for path in leftovers)
    _assert_same_cache(folder, seed_cache[0])


def _assert_find_equals_a_dict_of_every_row(cache: Cache) -> None:
    index = {key: row for row, key in enumerate(cache.keys())}
    keys = list(index)
    other_role = [("context" if role == "module" else "module", h) for role, h in keys[:5]]  # same hash, other role
    asked = [*keys[::-1], *keys[:7], *other_role, ("module", text_hash("never embedded"))]
    expected = [index.get(k, -1) for k in asked]
    found = cache.find(asked)
    assert found["row"].tolist() == expected and expected.count(-1) >= 1
    hit = found["row"] >= 0
    truncated = cache.text_columns(found["row"][hit], ["truncated"])["truncated"]
    np.testing.assert_array_equal(found["truncated"][hit], truncated)


def test_find_equals_a_dict_of_every_row(seed_cache) -> None:
    cache, _ = open_existing(seed_cache[0])
    assert cache.find([]).shape == (0,)
    _assert_find_equals_a_dict_of_every_row(cache)


def test_a_commit_takes_each_text_once_in_the_callers_order_then_the_unlisted_sorted(tmp_path: Path) -> None:
    """Rows follow `order` (first appearance in the caller's pairs); texts no one listed (a killed run's shards for
    other data) follow, sorted by key; a text in two shards (two ranks, a rerun) is committed once, the first copy."""
    fingerprint = Fingerprint("synthetic", None, "0" * 64, "mean", True, "", 512, 512, 4)
    names = ("m1", "m2", "c1", "x1", "x2")  # c: a context; the others module texts
    key = {name: ("context" if name[0] == "c" else "module", text_hash(name)) for name in names}
    shards = [["x2", "m2", "c1"], ["m1", "x1", "m2"], ["x2", "x1"]]
    with Cache.open(tmp_path / "cache", fingerprint) as cache:
        for number, names in enumerate(shards):
            vectors = np.arange(len(names) * 4, dtype=np.float16).reshape(-1, 4) + 100 * number
            cache.add_shard(Shard([key[n] for n in names], np.arange(len(names)), np.zeros(len(names), bool), vectors))
        assert cache.commit([key["m1"], key["c1"], key["m2"]]) == 5
        unlisted = sorted([key["x1"], key["x2"]])
        assert cache.keys() == [key["m1"], key["c1"], key["m2"], *unlisted]
        first_copy = {  # the shard and position where each text first appears
            name: (s, names.index(name)) for s, names in reversed(list(enumerate(shards))) for name in names
        }
        expected = [first_copy[n] for n in ("m1", "c1", "m2")]
        expected += [first_copy[n] for n in sorted(("x1", "x2"), key=lambda n: key[n])]
        vectors = np.asarray(cache.embeddings(), dtype=np.float32)
        assert [(int(v[0]) // 100, (int(v[0]) % 100) // 4) for v in vectors] == expected
