"""Stage 0, part one: every unique text of the pairs, encoded once, into the cache.

Texts are deduplicated by content across all files, within each role (a context seen in ten pairs is encoded once),
only texts the cache lacks are encoded, and work is written in shards so a killed run resumes.

Memory does not grow with the number of pairs or texts: nothing per text is held but a bit per appearance.
    pass one   (scan_pairs)  each text is hashed to its key and dropped; keys go to disk bucketed by key
    plan       (make_plan)   a few buckets at a time: first appearances, cache lookups; then, a range of
                             positions at a time, each text's future cache row and each rank's share
    pass two   (ensure_embedded)  this rank's texts, met again, encoded a shard at a time into pending/
    commit     (Cache.commit)  the shards become one segment, rows in the plan's order
    the index  (write_pairs_index)  the pairs index, a batch at a time, from pass one's columns and the rows
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import importlib.metadata as md
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.atomic import atomic_write, write_json
from pipeline.cache import ROW_COLUMNS, Cache, Shard, read_manifest
from pipeline.config import Config
from pipeline.data import DataError, Pair, PairFiles, assign_split, duplicate_id, file_sha256
from pipeline.distributed import Group
from pipeline.encoder import Encoder, ModelInfo, describe
from pipeline.errors import ModrmError
from pipeline.keys import BUCKETS, KEY, ROLE_NAMES, bucket, index_in, roles_of, text_key
from pipeline.spill import Bits, Spill, records

SHARD_TEXTS = 4096  # texts per resumable shard: a kill loses at most this much work
INDEX_BATCH = 1 << 13  # pairs per arrow batch of the pairs index's columns while they are read


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
        encoded = "nothing to encode: every text was already in the cache"
        if self.encoded:
            seconds = max(self.seconds, 1e-9)
            encoded = (
                f"encoded {self.encoded} texts in {self.seconds:.1f}s ({self.encoded / seconds:,.1f} texts/s, "
                f"{self.tokens / seconds:,.0f} tokens/s)"
            )
        return [
            f"pairs: {self.n_pairs}  unique texts: {self.unique_texts}  already cached: {self.cached}",
            encoded,
            f"truncated: {self.truncated}  texts re-encoded in fp32: {self.fp32_fallbacks}",
            "splits: " + "  ".join(f"{k} {v}" for k, v in self.splits.items()),
            *([f"pairs index: {self.index}"] if self.index else []),
        ]


ROLES = tuple("context" if column.endswith("ctx_row") else "module" for column in ROW_COLUMNS)
INDEX_SCHEMA = pa.schema(  # the pairs index's columns but the rows, as a scan collects them
    [(name, pa.string()) for name in ("pair_id", "target_module", "task", "group", "split")]
    + [(name, pa.float64()) for name in ("pos_outcome", "neg_outcome")]
)
APPEARANCE = np.dtype([("key", KEY), ("at", np.int64), ("length", np.int64)])  # a text where pass one met it
ROW_CODE = np.dtype([("at", np.int64), ("code", np.int64)])  # its cache row, or -(its text's first appearance + 1)
NEW_TEXT = np.dtype([("at", np.int64), ("key", KEY), ("cost", np.int64), ("encode", np.bool_)])
PAIR_ID = np.dtype([("hash", np.uint64), ("pair", np.int64)])  # a pair_id's 8-byte hash, where the pair is
GROUP_APPEARANCES = 1 << 16  # appearances deduplicated at once (a few buckets of keys: some 10 MB)
RANGE = 1 << 16  # appearances brought back in pair order at once (a few MB)


@dataclass
class Scan:
    """What pass one over the pairs leaves, on disk in `work`, without their texts: every appearance of a text
    (its key, place and length) bucketed by key, and the pairs index's other columns. A pair's texts are
    appearances 4n .. 4n + 3, in ROW_COLUMNS order."""

    work: Path
    n_pairs: int
    appearances: Spill  # APPEARANCE records, by pipeline.keys.bucket
    ids: Spill  # PAIR_ID records, by hash
    index: Path  # parquet, INDEX_SCHEMA

    @property
    def n_appearances(self) -> int:
        return 4 * self.n_pairs


def scan_pairs(pairs: Iterable[Pair], config: Config, work: Path, progress: bool = False) -> Scan:
    """Pass one: each text is hashed and dropped; its key goes to disk with its place and length, a batch at a
    time, as do the index columns. What is held is one batch, however many pairs."""
    work.mkdir(parents=True, exist_ok=True)
    appearances = Spill(work / "appearances", APPEARANCE, BUCKETS)
    ids = Spill(work / "ids", PAIR_ID, BUCKETS)
    keys, lengths = bytearray(), array.array("q")
    columns: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    d, n_pairs = config.data, 0
    with pq.ParquetWriter(work / "index.parquet", INDEX_SCHEMA) as index:

        def flush() -> None:
            nonlocal keys, lengths, columns
            at = np.arange(4 * n_pairs - len(lengths), 4 * n_pairs)
            found, length = np.frombuffer(keys, dtype=KEY), np.frombuffer(lengths, dtype=np.int64)
            appearances.add(bucket(found), records(APPEARANCE, key=found, at=at, length=length))
            hashes = np.array([_id_hash(pair_id) for pair_id in columns["pair_id"]], dtype=np.uint64)
            numbers = np.arange(n_pairs - len(hashes), n_pairs)
            ids.add((hashes % BUCKETS).astype(np.int64), records(PAIR_ID, hash=hashes, pair=numbers))
            index.write_batch(pa.RecordBatch.from_pydict(columns, schema=INDEX_SCHEMA))
            keys, lengths, columns = bytearray(), array.array("q"), {name: [] for name in INDEX_SCHEMA.names}

        for pair in tqdm(pairs, desc="read pairs", unit="pair", disable=not progress, dynamic_ncols=True):
            for role, text in zip(ROLES, config.encoder.pair_texts(pair), strict=True):
                keys += text_key(role, text)
                lengths.append(len(text))
            split = assign_split(pair.split_key, d.train_fraction, d.val_fraction, d.split_seed)
            values = (pair.pair_id, pair.target_module, pair.task, pair.split_key, split)
            for name, value in zip(columns, (*values, pair.positive.outcome, pair.negative.outcome), strict=True):
                columns[name].append(value)
            n_pairs += 1
            if n_pairs % INDEX_BATCH == 0:
                flush()
        flush()
    return Scan(work, n_pairs, appearances, ids, work / "index.parquet")


def _id_hash(pair_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(pair_id.encode("utf-8"), digest_size=8).digest(), "little")


def check_unique_ids(scan: Scan, files: Sequence[tuple[str, int]]) -> None:
    """pair_ids unique over all the files (given with the pairs each gave, in order), checked a bucket of id
    hashes at a time: only pairs whose hashes meet are read back, to compare their ids. DataError names each pair
    met again, in pair order, as PairFiles would."""
    suspects = [np.empty(0, np.int64)]
    for lo, hi in scan.ids.groups(GROUP_APPEARANCES):
        ids = np.sort(scan.ids.read(lo, hi), order=["hash", "pair"])
        same = ids["hash"][1:] == ids["hash"][:-1]
        suspects.append(ids["pair"][np.concatenate([same, [False]]) | np.concatenate([[False], same])])
    suspects = np.sort(np.concatenate(suspects))
    if not len(suspects):
        return
    names: list[str] = []
    with pq.ParquetFile(scan.index) as index:
        start = 0
        for batch in index.iter_batches(batch_size=INDEX_BATCH, columns=["pair_id"]):
            inside = suspects[(suspects >= start) & (suspects < start + len(batch))] - start
            names += batch.column(0).take(pa.array(inside)).to_pylist()
            start += len(batch)
    ends = np.cumsum([count for _, count in files])
    file_of = [files[int(np.searchsorted(ends, n, side="right"))][0] for n in suspects.tolist()]
    first: dict[str, str] = {}  # where each suspect id was first met
    problems = []
    for name, file in zip(names, file_of, strict=True):
        if name in first:
            problems.append(duplicate_id(file, name, first[name]))
        first.setdefault(name, file)
    if problems:
        raise DataError(problems)


@dataclass
class Plan:
    """Where every text of the pairs goes, worked out by key from pass one's buckets before anything is encoded.
    On disk: each appearance's cache row (pair order) and the texts the cache lacks (first-appearance order: the
    commit's order, so their rows are known now). In memory, a bit an appearance: what this rank encodes."""

    rows: Path  # int64 [pairs, 4]: each text's cache row once `listed` is committed
    listed: Path  # KEY: the texts new to the cache, in first-appearance order
    n_listed: int
    mine: Bits  # the first appearances of the texts this rank encodes
    mine_digest: bytes  # SHA-256 of their keys in order: pass two must meet the same texts
    to_encode: int  # by every rank together
    unique: int
    truncated: int  # among the cached texts


def make_plan(scan: Scan, cache: Cache, pending: np.ndarray, limits: dict[str, int], group: Group) -> Plan:
    """Deduplicate by key a group of buckets at a time (the first appearance of each text wins), look the texts up
    in the cache and in the pending shards, then bring rows and shares back in pair order a range at a time."""
    n, base = scan.n_appearances, cache.n_rows
    ranges = n // RANGE + 1
    codes = Spill(scan.work / "codes", ROW_CODE, ranges)
    news = Spill(scan.work / "new", NEW_TEXT, ranges)
    first = Bits(n)  # the first appearance of each text the cache lacks: its row is base + the count before it
    cap = np.array([limits[role] for role in ROLE_NAMES], dtype=np.int64)
    unique = truncated = to_encode = 0
    for lo, hi in scan.appearances.groups(GROUP_APPEARANCES):
        seen = scan.appearances.read(lo, hi)  # each bucket's in pair order
        keys, where, inverse = np.unique(seen["key"], return_index=True, return_inverse=True)
        at, found = seen["at"][where], cache.find(keys)
        row = found["row"]
        new = row < 0
        codes.add(seen["at"] // RANGE, records(ROW_CODE, at=seen["at"], code=np.where(new, -1 - at, row)[inverse]))
        unique += len(keys)
        truncated += int(found["truncated"].sum())
        keys, at, length = keys[new], at[new], seen["length"][where][new]
        done = index_in(keys, pending) >= 0 if len(pending) else np.zeros(len(keys), dtype=bool)
        cost = np.minimum(length // 4 + 1, cap[roles_of(keys)])  # estimated tokens, to balance ranks
        news.add(at // RANGE, records(NEW_TEXT, at=at, key=keys, cost=cost, encode=~done))
        to_encode += int((~done).sum())
        first.set(at)
    rank, mine, digest = first.ranks(), Bits(n), hashlib.sha256()
    rows, listed = scan.work / "rows.bin", scan.work / "listed.bin"
    with rows.open("wb") as rows_out, listed.open("wb") as listed_out:
        for r in range(ranges):
            coded = codes.read(r)
            row = np.empty(len(coded), dtype=np.int64)
            row[coded["at"] - r * RANGE] = coded["code"]  # every appearance of the range once
            new = row < 0
            row[new] = base + rank(-1 - row[new])
            row.tofile(rows_out)
            texts = np.sort(news.read(r), order="at")
            np.ascontiguousarray(texts["key"]).tofile(listed_out)
            encode = texts[texts["encode"]]
            share = encode[rank_share(encode["cost"], group)]
            mine.set(share["at"])
            digest.update(np.ascontiguousarray(share["key"]).tobytes())
    return Plan(rows, listed, first.count(), mine, digest.digest(), to_encode, unique, truncated)


def ensure_embedded(
    pairs: Iterable[Pair],
    scan: Scan,
    cache: Cache,
    config: Config,
    info: ModelInfo,
    summary: EmbedSummary,
    progress: bool = True,
    group: Group = Group(),
) -> Path:
    """Encode (and cache) what the cache lacks of the pairs' texts; returns the file of their cache rows
    (`read_rows`). Pass two over `pairs` (the same pairs `scan` saw) picks up this rank's texts as it meets them
    and encodes them a shard at a time, so no more texts are held than one shard per role. Under torchrun every
    rank encodes its share of the missing texts into its own pending shards; rank 0 commits them."""
    pending = cache.pending_keys()
    group.barrier()  # every rank has read pending/ before any rank adds to it
    limits = {"context": config.encoder.max_context_tokens, "module": config.encoder.max_module_tokens}
    plan = make_plan(scan, cache, pending, limits, group)
    summary.unique_texts, summary.cached = plan.unique, plan.unique - plan.to_encode  # pending counts as cached
    if plan.to_encode:
        encoder = Encoder.load(config.encoder, info) if plan.mine.count() else None
        start = time.perf_counter()
        encoded, tokens = _encode_mine(pairs, scan, plan, cache, config, encoder, progress, group)
        counts = group.gather((encoded, tokens, encoder.fallback_texts if encoder else 0))
        summary.seconds = time.perf_counter() - start
        summary.encoded, summary.tokens, summary.fp32_fallbacks = map(sum, zip(*counts, strict=True))
    group.barrier()  # every rank's shards are written
    if group.is_main:
        listed_rows = np.arange(cache.n_rows, cache.n_rows + plan.n_listed)  # they come first in the new segment
        cache.commit(np.memmap(plan.listed, dtype=KEY, mode="r") if plan.n_listed else np.empty(0, KEY))
        summary.truncated = plan.truncated + int(cache.text_columns(listed_rows, ["truncated"])["truncated"].sum())
    group.barrier()  # the commit is visible
    return plan.rows


def _encode_mine(
    pairs: Iterable[Pair],
    scan: Scan,
    plan: Plan,
    cache: Cache,
    config: Config,
    encoder: Encoder | None,
    progress: bool,
    group: Group,
) -> tuple[int, int]:
    """Pass two: this rank's texts, encoded into pending shards as they are met. Returns (texts, tokens)."""
    waiting: dict[str, list[tuple[bytes, str, str]]] = {"context": [], "module": []}  # (key, text, head)
    encoded = tokens = met = 0
    digest = hashlib.sha256()

    def flush(role: str) -> None:
        nonlocal encoded, tokens
        shard = _encode_shard(encoder, waiting[role], role, progress and group.is_main)
        cache.add_shard(shard, group.rank)
        encoded, tokens = encoded + len(shard.keys), tokens + int(shard.n_tokens.sum())
        waiting[role] = []

    changed = ModrmError("the pairs changed while they were being embedded (a file rewritten?); run embed again")
    for n, pair in enumerate(pairs):
        met = n + 1
        if met > scan.n_pairs:
            raise changed
        wanted = plan.mine.nibble(n)
        if not wanted:
            continue
        head = config.encoder.context_head(pair.task)  # what truncation of a context keeps
        for k, (role, text) in enumerate(zip(ROLES, config.encoder.pair_texts(pair), strict=True)):
            if wanted >> k & 1:
                key = text_key(role, text)
                digest.update(key)
                waiting[role].append((key, text, head))
                if len(waiting[role]) == SHARD_TEXTS:
                    flush(role)
    if met != scan.n_pairs or digest.digest() != plan.mine_digest:
        raise changed
    for role, texts in waiting.items():
        if texts:
            flush(role)
    return encoded, tokens


def read_rows(path: Path, start: int = 0, n: int = -1) -> np.ndarray:
    """Pairs start .. start + n of a rows file (all from `start` when n is -1): int64 [pairs, 4]."""
    return np.fromfile(path, dtype=np.int64, count=4 * n if n >= 0 else -1, offset=32 * start).reshape(-1, 4)


def rank_share(cost: np.ndarray, group: Group) -> np.ndarray:
    """This rank's share of texts of these estimated costs (as indices, ascending), the same split on every rank,
    balanced: longest first, dealt out back and forth (0, 1, ..., N-1, N-1, ..., 0, ...)."""
    if not group.distributed:
        return np.arange(len(cost))
    order = np.argsort(-cost, kind="stable")
    lap, seat = np.divmod(np.arange(len(order)), group.world_size)
    rank = np.where(lap % 2 == 0, seat, group.world_size - 1 - seat)
    return np.sort(order[rank == group.rank])


def _encode_shard(encoder: Encoder, texts: list[tuple[bytes, str, str]], role: str, progress: bool) -> Shard:
    tokens = encoder.tokenize([t for _, t, _ in texts], role, heads=[h for _, _, h in texts])
    embeddings = np.empty((len(texts), encoder.dim), dtype=np.float16)
    for index, emb in encoder.encode_tokenized(tokens, desc=f"embed {role}s", progress=progress):
        embeddings[index] = emb
    keys = np.frombuffer(b"".join(k for k, _, _ in texts), dtype=KEY)
    return Shard(keys, tokens.lengths, tokens.truncated, embeddings)


def versions() -> dict[str, str]:
    names = ("modrm", "torch", "transformers", "tokenizers", "h5py", "pyarrow")
    return {name: md.version(name) for name in names}


def embed_files(
    paths: Sequence[str | Path],
    cache_dir: str | Path,
    config: Config,
    progress: bool = True,
    append: bool = False,
    wait: bool = True,
) -> EmbedSummary:
    """`modrm embed`: load and validate the pairs, encode what the cache lacks, write the pairs index. The index
    holds these files' pairs (and says so when it replaced others), or with `append` the earlier ones too.
    Working files (keys, places, rows: up to some 700 bytes a pair) go to a temporary folder (TMPDIR).

    Under torchrun, rank 0 holds the cache's lock and writes the index; every rank encodes a share."""
    group = Group.from_env(config.encoder.device)
    encoder = dataclasses.replace(config.encoder, device=group.device(config.encoder.device))  # cuda:LOCAL_RANK
    config = dataclasses.replace(config, encoder=encoder)
    pairs = PairFiles(paths, config.data.modules, check_ids=False)  # ids: check_unique_ids, on disk
    with tempfile.TemporaryDirectory(prefix=f"modrm-embed-r{group.rank}-") as work:
        scan = scan_pairs(pairs, config, Path(work), progress and group.is_main)  # every problem found before a write
        check_unique_ids(scan, list(zip(map(str, paths), pairs.counts, strict=True)))
        info = describe(config.encoder)
        opened = group.on_main(lambda: Cache.open(cache_dir, info.fingerprint, wait))  # the lock, and any repair
        cache = opened if opened is not None else Cache.read(cache_dir, info.fingerprint)
        try:
            summary = EmbedSummary(n_pairs=scan.n_pairs)
            if group.is_main:
                summary = _index_pairs(paths, pairs, scan, cache, config, info, summary, progress, append, group)
            else:
                ensure_embedded(pairs, scan, cache, config, info, summary, progress, group)
            return summary
        finally:
            cache.close()


def _index_pairs(
    paths: Sequence[str | Path],
    pairs: Iterable[Pair],
    scan: Scan,
    cache: Cache,
    config: Config,
    info: ModelInfo,
    summary: EmbedSummary,
    progress: bool,
    append: bool,
    group: Group,
) -> EmbedSummary:
    manifest = read_manifest(cache.folder) or {}
    previous = cache.read_pairs(["pair_id"]) if (cache.folder / "pairs.parquet").exists() else None
    n_previous = len(previous) if previous is not None else 0
    earlier_files = list(manifest.get("data_files", [])) if previous is not None else []
    if append and previous is not None:
        check_appendable(previous.column("pair_id"), scan, manifest, config, cache.folder)
    rows = ensure_embedded(pairs, scan, cache, config, info, summary, progress, group)
    if append and previous is not None:
        summary.index = f"appended {scan.n_pairs} pairs to the {n_previous} already indexed"
    elif previous is not None and earlier_files != [str(p) for p in paths]:
        summary.index = (
            f"replaced: it held {n_previous} pairs from {', '.join(earlier_files) or 'other files'} "
            "(--append keeps them)"
        )
    splits = write_pairs_index(cache, scan, rows, append and previous is not None)
    summary.splits = {s: splits.get(s, 0) for s in ("train", "val", "test")}
    files = [*earlier_files, *map(str, paths)] if append else list(map(str, paths))
    earlier_sha = list(manifest.get("data_sha256", [])) if append and previous is not None else []
    total = scan.n_pairs + (n_previous if append else 0)
    write_manifest(cache, config, files, [*earlier_sha, *map(file_sha256, paths)], summary, total)
    return summary


def write_pairs_index(cache: Cache, scan: Scan, rows: Path, append: bool) -> dict[str, int]:
    """pairs.parquet (atomically): with `append` the indexed pairs first, then the scanned ones with their four
    cache rows, a batch at a time. Returns the pairs of each split."""
    splits: Counter[str] = Counter()
    schema = INDEX_SCHEMA
    at = schema.get_field_index("pos_outcome")
    for k, column in enumerate(ROW_COLUMNS):
        schema = schema.insert(at + k, pa.field(column, pa.int64()))

    def batches() -> Iterator[pa.RecordBatch]:
        if append:
            with pq.ParquetFile(cache.folder / "pairs.parquet") as previous:
                for batch in previous.iter_batches(batch_size=INDEX_BATCH, columns=schema.names):
                    yield pa.RecordBatch.from_arrays([batch.column(name) for name in schema.names], schema=schema)
        start = 0
        with pq.ParquetFile(scan.index) as index:
            for batch in index.iter_batches(batch_size=INDEX_BATCH):
                block = read_rows(rows, start, len(batch))
                start += len(batch)
                columns = dict(zip(batch.schema.names, batch.columns, strict=True))
                columns |= {column: pa.array(block[:, k]) for k, column in enumerate(ROW_COLUMNS)}
                yield pa.RecordBatch.from_pydict(columns, schema=schema)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as out:
            for batch in batches():
                out.write_batch(batch)
                for count in pc.value_counts(batch.column(schema.get_field_index("split"))).to_pylist():
                    splits[count["values"]] += count["counts"]

    atomic_write(cache.folder / "pairs.parquet", write)
    return dict(splits)


def check_appendable(indexed: pa.ChunkedArray, scan: Scan, manifest: dict, config: Config, folder: Path) -> None:
    """Appended pairs keep their ids distinct from the `indexed` ones and are split as those were."""
    built = manifest.get("config", {}).get("data", {})
    for key in ("train_fraction", "val_fraction", "split_seed"):
        if key in built and built[key] != getattr(config.data, key):
            raise ModrmError(
                f"{folder}: --append with data.{key} = {getattr(config.data, key)!r}, but the index was split with "
                f"{built[key]!r}; use the same setting, or embed without --append to replace the index"
            )
    with pq.ParquetFile(scan.index) as index:
        for batch in index.iter_batches(batch_size=INDEX_BATCH, columns=["pair_id"]):
            clashes = batch.column(0).filter(pc.is_in(batch.column(0), value_set=indexed))
            if len(clashes):
                raise ModrmError(
                    f"{folder}: --append: pair_id {clashes[0].as_py()!r} is already in the pairs index; give "
                    "distinct ids, or embed without --append to replace the index"
                )


def write_manifest(
    cache: Cache,
    config: Config,
    paths: Sequence[str | Path],
    sha256: Sequence[str],
    summary: EmbedSummary,
    n_pairs: int,
) -> None:
    import torch

    from pipeline.encoder import pick_device, pick_dtype

    device = pick_device(config.encoder.device)
    write_json(
        cache.folder / "manifest.json",
        {
            "encoder": cache.fingerprint.to_dict(),
            "compute_dtype": str(pick_dtype(config.encoder.dtype, device)).removeprefix("torch."),
            "storage_dtype": "float16",
            "n_texts": cache.n_rows,
            "n_pairs": n_pairs,
            "splits": summary.splits,
            "data_files": [str(p) for p in paths],
            "data_sha256": list(sha256),  # what the pairs index holds, by content (eval leaves it out by default)
            "config": config.to_dict(),
            "versions": versions() | {"cuda": torch.version.cuda or "none"},
        },
    )
