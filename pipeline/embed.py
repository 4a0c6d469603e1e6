"""Stage 0, part one: every distinct text of the pairs, encoded once, into the cache; then the pairs index.

Texts are deduplicated by content within each role across all files, only texts the cache lacks are encoded, and
work is written in shards so a killed run resumes. Memory holds some 150 bytes a pair, never the texts:
    pass one  (scan_pairs)       each text hashed to its key and dropped; the index's other columns to a file
    plan      (make_plan)        distinct keys in first-appearance order, their cache rows, each rank's share
    pass two  (encode_mine)      this rank's texts, met again, encoded a shard at a time into pending/
    commit    (Cache.commit)     rank 0: the shards as one new segment, the pairs index and the manifest at once
"""

from __future__ import annotations

import array
import dataclasses
import importlib.metadata as md
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from pipeline.cache import ROW_COLUMNS, Cache, Shard, as_keys, key_bytes, text_key
from pipeline.config import Config
from pipeline.data import Pair, PairFiles, file_sha256
from pipeline.distributed import Group
from pipeline.encoder import Encoder, ModelInfo, describe, pick_device, pick_dtype
from pipeline.errors import ModrmError
from pipeline.pairwise import split_by_group

SHARD_TEXTS = 4096  # texts per resumable shard: a kill loses at most this much work
INDEX_BATCH = 1 << 13  # pairs per batch of the pairs index
PAIR_ROLES = ("context", "module", "context", "module")  # of ROW_COLUMNS
PAIRS_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("pair_id", "target_module", "task", "group", "split")]
    + [(name, pa.int64()) for name in ROW_COLUMNS]
    + [(name, pa.float64()) for name in ("pos_outcome", "neg_outcome")]
)
INDEX_SCHEMA = pa.schema([f for f in PAIRS_SCHEMA if f.name not in (*ROW_COLUMNS, "split")])  # pass one collects


@dataclass
class EmbedSummary:
    n_pairs: int = 0
    unique_texts: int = 0
    cached: int = 0
    encoded: int = 0
    tokens: int = 0
    truncated: int = 0
    fp32_fallbacks: int = 0
    seconds: float = 0.0
    splits: dict[str, int] = field(default_factory=dict)
    index: str = ""  # what became of an earlier pairs index (replaced, appended to); empty for a new one

    def lines(self) -> list[str]:
        rate = f"{self.encoded / max(self.seconds, 1e-9):,.1f} texts/s, {self.tokens / max(self.seconds, 1e-9):,.0f}"
        encoded = f"encoded {self.encoded} texts in {self.seconds:.1f}s ({rate} tokens/s)"
        return [
            f"pairs: {self.n_pairs}  unique texts: {self.unique_texts}  already cached: {self.cached}",
            encoded if self.encoded else "nothing to encode: every text was already in the cache",
            f"truncated: {self.truncated}  texts re-encoded in fp32: {self.fp32_fallbacks}",
            "splits: " + "  ".join(f"{k} {v}" for k, v in self.splits.items()),
            *([f"pairs index: {self.index}"] if self.index else []),
        ]


@dataclass
class Scan:
    """Pass one, and what pass two needs to meet the pairs again: pair n's texts are keys 4n .. 4n + 3."""

    pairs: Iterable[Pair]
    config: Config
    keys: pa.FixedSizeBinaryArray
    lengths: np.ndarray  # int32: each text's characters (what ranks' shares are balanced by)
    index: Path  # the pairs index's other columns (INDEX_SCHEMA), a parquet file

    @property
    def n_pairs(self) -> int:
        return len(self.keys) // 4


def scan_pairs(pairs: Iterable[Pair], config: Config, work: Path, progress: bool = False) -> Scan:
    """Pass one: each text hashed to its key and dropped; the index columns written a batch at a time."""
    keys, lengths = bytearray(), array.array("i")
    columns: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    with pq.ParquetWriter(work / "index.parquet", INDEX_SCHEMA) as index:
        for pair in tqdm(pairs, desc="read pairs", unit="pair", disable=not progress, dynamic_ncols=True):
            for role, text in zip(PAIR_ROLES, config.encoder.pair_texts(pair), strict=True):
                keys += text_key(role, text)
                lengths.append(len(text))
            values = [pair.pair_id, pair.target_module, pair.task, pair.split_key]
            for name, value in zip(columns, [*values, pair.positive.outcome, pair.negative.outcome], strict=True):
                columns[name].append(value)
            if len(columns["pair_id"]) == INDEX_BATCH:
                index.write_batch(pa.RecordBatch.from_pydict(columns, schema=INDEX_SCHEMA))
                columns = {name: [] for name in INDEX_SCHEMA.names}
        index.write_batch(pa.RecordBatch.from_pydict(columns, schema=INDEX_SCHEMA))
    return Scan(pairs, config, as_keys(keys), np.frombuffer(lengths, np.int32), work / "index.parquet")


@dataclass
class Plan:
    """Where every text of the pairs goes, worked out from the keys before anything is encoded."""

    rows: np.ndarray  # int64 [pairs, 4]: each text's cache row once `order` is committed
    order: pa.FixedSizeBinaryArray  # the texts new to the cache, in first-appearance order (the commit's)
    mine: np.ndarray  # uint8 per pair: bit k set where its text k is one this rank encodes (its first appearance)
    to_encode: int  # by every rank together
    distinct_rows: np.ndarray  # the row of each distinct text


def make_plan(scan: Scan, cache: Cache, pending: pa.Array, group: Group) -> Plan:
    """Deduplicate the keys (the first appearance of each text wins), look them up in the cache, number the new
    ones after the cache's rows, and deal the ones no pending shard holds out to the ranks, balanced by length."""
    first_of = pc.index_in(scan.keys, value_set=scan.keys).to_numpy()  # each appearance's text's first appearance
    is_first = first_of == np.arange(len(first_of))
    first, at = np.flatnonzero(is_first), (np.cumsum(is_first) - 1)[first_of]  # texts' first appearances; whose
    distinct = scan.keys.take(pa.array(first))
    row = cache.find(distinct)
    new = row < 0
    row[new] = cache.n_rows + np.arange(new.sum())
    todo = np.flatnonzero(new & ~pc.is_in(distinct, value_set=pending).to_numpy(zero_copy_only=False))
    limits = np.array([scan.config.encoder.max_context_tokens, scan.config.encoder.max_module_tokens])  # by role
    cost = np.minimum(scan.lengths[first[todo]] // 4 + 1, limits[key_bytes(distinct)[todo, 0]])  # about the tokens
    deal = np.argsort(-cost, kind="stable")  # longest first, dealt out back and forth: 0, 1, ..., N-1, N-1, ..., 0
    lap, seat = np.divmod(np.arange(len(deal)), group.world_size)
    mine = np.zeros(len(at), dtype=np.uint8)
    mine[first[todo[deal[np.where(lap % 2 == 0, seat, group.world_size - 1 - seat) == group.rank]]]] = 1
    nibbles = (mine.reshape(-1, 4) << np.arange(4, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
    return Plan(row[at].reshape(-1, 4), distinct.filter(pa.array(new)), nibbles, len(todo), row)


def ensure_embedded(
    scan: Scan, cache: Cache, info: ModelInfo, summary: EmbedSummary, progress: bool = True, group: Group = Group()
) -> Plan:
    """Encode the texts the cache lacks into pending shards, every rank its share (rank 0 then commits `plan.order`)."""
    pending = cache.pending_keys()
    group.barrier()  # every rank has read pending/ before any rank adds to it
    plan = make_plan(scan, cache, pending, group)
    summary.unique_texts, summary.cached = len(plan.distinct_rows), len(plan.distinct_rows) - plan.to_encode
    if plan.to_encode:
        encoder = Encoder.load(scan.config.encoder, info) if plan.mine.any() else None
        start = time.perf_counter()
        encoded, tokens = encode_mine(scan, plan, cache, encoder, progress and group.is_main, group.rank)
        counts = group.gather((encoded, tokens, encoder.fallback_texts if encoder else 0))
        summary.seconds = time.perf_counter() - start
        summary.encoded, summary.tokens, summary.fp32_fallbacks = map(sum, zip(*counts, strict=True))
    group.barrier()  # every rank's shards are written
    return plan


def encode_mine(
    scan: Scan, plan: Plan, cache: Cache, encoder: Encoder | None, progress: bool, rank: int
) -> tuple[int, int]:
    """Pass two: this rank's texts, encoded into pending shards as met (each with pass one's key): (texts, tokens)."""
    waiting: dict[str, list[tuple[bytes, str, str]]] = {"context": [], "module": []}  # (key, text, head)
    expected, encoded, tokens, met = key_bytes(scan.keys), 0, 0, 0
    changed = ModrmError("the pairs changed while they were being embedded (a file rewritten?); run embed again")

    def flush(role: str) -> None:
        nonlocal encoded, tokens
        texts, waiting[role] = waiting[role], []
        shard_tokens = encoder.tokenize([t for _, t, _ in texts], role, heads=[h for _, _, h in texts])
        embeddings = np.empty((len(texts), encoder.dim), dtype=np.float16)
        for index, emb in encoder.encode_tokenized(shard_tokens, desc=f"embed {role}s", progress=progress):
            embeddings[index] = emb
        keys = as_keys(b"".join(k for k, _, _ in texts))
        cache.add_shard(Shard(keys, shard_tokens.lengths, shard_tokens.truncated, embeddings), rank)
        encoded, tokens = encoded + len(texts), tokens + int(shard_tokens.lengths.sum())

    for n, pair in enumerate(scan.pairs):
        met, wanted = n + 1, int(plan.mine[n]) if n < len(plan.mine) else 0
        head = scan.config.encoder.context_head(pair.task) if wanted else ""  # what truncation of a context keeps
        for k, (role, text) in enumerate(zip(PAIR_ROLES, scan.config.encoder.pair_texts(pair), strict=True)):
            if wanted >> k & 1:
                waiting[role].append((text_key(role, text), text, head))
                if waiting[role][-1][0] != expected[4 * n + k].tobytes():
                    raise changed
                if len(waiting[role]) == SHARD_TEXTS:
                    flush(role)
    if met != scan.n_pairs:
        raise changed
    for role in [role for role, texts in waiting.items() if texts]:
        flush(role)
    return encoded, tokens


def embed_files(
    paths: Sequence[str | Path],
    cache_dir: str | Path,
    config: Config,
    progress: bool = True,
    append: bool = False,
    wait: bool = True,
) -> EmbedSummary:
    """`modrm embed`: read and check the pairs, encode what the cache lacks, commit the pairs index with them: these
    files' pairs (saying so when they replace others), or with `append` the earlier ones and these. Under torchrun,
    rank 0 holds the cache's lock and commits; every rank encodes a share."""
    group = Group.from_env(config.encoder.device)
    encoder = dataclasses.replace(config.encoder, device=group.device(config.encoder.device))  # cuda:LOCAL_RANK
    config = dataclasses.replace(config, encoder=encoder)
    pairs = PairFiles(paths, config.data.modules, check_ids=False)  # ids: checked from pass one's file
    with tempfile.TemporaryDirectory(prefix=f"modrm-embed-r{group.rank}-") as work:
        scan = scan_pairs(pairs, config, Path(work), progress and group.is_main)  # every problem found before a write
        ids = pq.read_table(scan.index, columns=["pair_id"]).column(0)
        if pc.count_distinct(ids).as_py() != len(ids):  # a pair_id met twice: named as loading names it
            list(PairFiles(paths, config.data.modules))  # raises the DataError (holding the ids alone)
        info = describe(config.encoder)
        opened = group.on_main(lambda: Cache.open(cache_dir, info.fingerprint, wait))  # rank 0 writes
        cache = opened or Cache(cache_dir, info.fingerprint)
        try:
            summary = EmbedSummary(n_pairs=scan.n_pairs)
            kept = index_kept(cache, scan, [str(p) for p in paths], append, summary) if group.is_main else None
            plan = ensure_embedded(scan, cache, info, summary, progress, group)
            if group.is_main:
                entries = manifest_entries(config, paths, cache.manifest if kept else {})
                cache.commit(plan.order, pairs_index(kept, scan, plan.rows), entries)
                summary.truncated = int(cache.text_columns(plan.distinct_rows, ["truncated"])["truncated"].sum())
                summary.splits = cache.manifest["splits"]
            group.barrier()  # the commit is visible
            return summary
        finally:
            cache.close()


def index_kept(cache: Cache, scan: Scan, paths: list[str], append: bool, summary: EmbedSummary) -> Path | None:
    """With `append`, the pairs index the new one keeps, once the new pairs are checked to join it (distinct ids, the
    same split settings); else None, and the summary says what the new index replaces."""
    if "pairs" not in cache.manifest:
        return None
    indexed, folder = cache.read_pairs(["pair_id"]).column("pair_id"), cache.folder
    if not append:
        if (earlier := cache.manifest.get("data_files", [])) != paths:
            summary.index = f"replaced: it held {len(indexed)} pairs from {', '.join(earlier) or 'other files'}"
            summary.index += " (--append keeps them)"
        return None
    built = cache.manifest.get("config", {}).get("data", {})
    for key in ("train_fraction", "val_fraction", "split_seed"):
        if key in built and built[key] != getattr(scan.config.data, key):
            raise ModrmError(
                f"{folder}: --append with data.{key} = {getattr(scan.config.data, key)!r}, but the index was split "
                f"with {built[key]!r}; use the same setting, or embed without --append to replace the index"
            )
    ids = pq.read_table(scan.index, columns=["pair_id"]).column(0)
    if len(clashes := ids.filter(pc.is_in(ids, value_set=indexed))):
        raise ModrmError(
            f"{folder}: --append: pair_id {clashes[0].as_py()!r} is already in the pairs index; give distinct ids, "
            "or embed without --append to replace the index"
        )
    summary.index = f"appended {scan.n_pairs} pairs to the {len(indexed)} already indexed"
    return cache.pairs_path()


def pairs_index(kept: Path | None, scan: Scan, rows: np.ndarray) -> pa.RecordBatchReader:
    """The pairs index, a batch at a time: the `kept` index's pairs first, then the scanned ones with their rows;
    each pair's split is its group's in `split_by_group` over every group of the index, as training splits them."""
    sources = [p for p in (kept, scan.index) if p is not None]
    groups = pa.chunked_array([pq.read_table(p, columns=["group"]).column(0) for p in sources]).unique()
    split_of = split_by_group(groups.to_pylist(), scan.config.data)
    names, splits = (pa.array(list(values), pa.string()) for values in (split_of, split_of.values()))

    def batches() -> Iterator[pa.RecordBatch]:
        start = 0
        for path in sources:
            with pq.ParquetFile(path) as file:
                for batch in file.iter_batches(INDEX_BATCH):
                    columns = dict(zip(batch.schema.names, batch.columns, strict=True))
                    if path == scan.index:  # the new pairs: their rows from the plan
                        block, start = rows[start : start + len(batch)], start + len(batch)
                        columns |= {column: pa.array(block[:, k]) for k, column in enumerate(ROW_COLUMNS)}
                    columns["split"] = splits.take(pc.index_in(columns["group"], value_set=names))
                    yield pa.RecordBatch.from_pydict({n: columns[n] for n in PAIRS_SCHEMA.names}, schema=PAIRS_SCHEMA)

    return pa.RecordBatchReader.from_batches(PAIRS_SCHEMA, batches())


def manifest_entries(config: Config, paths: Sequence[str | Path], kept: dict) -> dict:
    """What embed records besides the cache's own entries: the files the pairs index holds (`kept`'s, then these;
    by sha256 too, so eval knows a checkpoint's training files), the config, versions."""
    names = ("modrm", "torch", "transformers", "tokenizers", "h5py", "pyarrow")
    versions = {name: md.version(name) for name in names} | {"cuda": torch.version.cuda or "none"}
    dtype = str(pick_dtype(config.encoder.dtype, pick_device(config.encoder.device))).removeprefix("torch.")
    files = [*kept.get("data_files", []), *map(str, paths)]
    sha256 = [*kept.get("data_sha256", []), *map(file_sha256, paths)]
    run = {"compute_dtype": dtype, "storage_dtype": "float16", "config": config.to_dict(), "versions": versions}
    return run | {"data_files": files, "data_sha256": sha256}
