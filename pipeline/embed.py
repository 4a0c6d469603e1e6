"""Stage 0, part one: every unique text of the pairs, encoded once, into the cache.

Texts are deduplicated by content across all files, within each role (a context seen in ten pairs is encoded once),
only texts the cache lacks are encoded, and work is written in shards so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from pipeline.atomic import write_json
from pipeline.cache import ROW_COLUMNS, Cache, Shard, read_manifest
from pipeline.config import Config, EncoderConfig
from pipeline.data import Pair, PairFiles, assign_split, file_sha256
from pipeline.distributed import Group
from pipeline.encoder import Encoder, ModelInfo, describe
from pipeline.errors import ModrmError
from pipeline.keys import ROLE_NAMES, FirstSeen, index_in, roles_of, text_key

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


def texts_of(pair: Pair, encoder: EncoderConfig) -> tuple[str, str, str, str]:
    """A pair's four texts, in ROW_COLUMNS order; the context the encoder sees starts with the task."""
    return (
        encoder.context_text(pair.task, pair.positive.context),
        pair.positive.module_text,
        encoder.context_text(pair.task, pair.negative.context),
        pair.negative.module_text,
    )


def pair_texts(pairs: Sequence[Pair], encoder: EncoderConfig) -> dict[str, list[str]]:
    """The four texts of every pair, by column."""
    texts = [texts_of(p, encoder) for p in pairs]
    return {column: [t[k] for t in texts] for k, column in enumerate(ROW_COLUMNS)}


ROLES = tuple("context" if column.endswith("ctx_row") else "module" for column in ROW_COLUMNS)
INDEX_SCHEMA = pa.schema(  # the pairs index's columns but the rows, as a scan collects them
    [(name, pa.string()) for name in ("pair_id", "target_module", "task", "group", "split")]
    + [(name, pa.float64()) for name in ("pos_outcome", "neg_outcome")]
)


@dataclass
class Scan:
    """What one pass over the pairs leaves, without their texts: each distinct text's key (first appearance
    order) and length, each pair's four texts as positions in that order, and the pairs index's other columns."""

    keys: np.ndarray  # KEY (pipeline.keys): 33 bytes a distinct text
    lengths: np.ndarray  # characters, to balance ranks before any text is tokenized
    positions: np.ndarray  # [pairs, 4] int64: where each of a pair's texts is in `keys`
    table: pa.Table  # INDEX_SCHEMA

    @property
    def n_pairs(self) -> int:
        return len(self.positions)


def scan_pairs(pairs: Iterable[Pair], config: Config, progress: bool = False) -> Scan:
    """Pass one: keys, lengths and the index columns. A text is hashed and dropped, and what is kept is packed:
    33 bytes a distinct text (numpy), 32 a pair for its positions, and its index columns (arrow)."""
    seen = FirstSeen()
    batches: list[pa.RecordBatch] = []
    columns: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    d = config.data
    for pair in tqdm(pairs, desc="read pairs", unit="pair", disable=not progress, dynamic_ncols=True):
        for role, text in zip(ROLES, texts_of(pair, config.encoder), strict=True):
            seen.add(text_key(role, text), len(text))
        split = assign_split(pair.split_key, d.train_fraction, d.val_fraction, d.split_seed)
        values = (pair.pair_id, pair.target_module, pair.task, pair.split_key, split)
        for name, value in zip(columns, (*values, pair.positive.outcome, pair.negative.outcome), strict=True):
            columns[name].append(value)
        if len(columns["pair_id"]) == INDEX_BATCH:
            batches.append(pa.RecordBatch.from_pydict(columns, schema=INDEX_SCHEMA))
            columns = {name: [] for name in INDEX_SCHEMA.names}
    batches.append(pa.RecordBatch.from_pydict(columns, schema=INDEX_SCHEMA))
    keys, lengths, places = seen.finish()
    return Scan(keys, lengths, places.reshape(-1, 4), pa.Table.from_batches(batches))


def ensure_embedded(
    pairs: Iterable[Pair],
    scan: Scan,
    cache: Cache,
    config: Config,
    info: ModelInfo,
    summary: EmbedSummary,
    progress: bool = True,
    group: Group = Group(),
) -> dict[str, np.ndarray]:
    """Cache rows of the four texts of every pair (ROW_COLUMNS), encoding (and caching) only what the cache lacks.
    Pass two over `pairs` (the same pairs `scan` saw) picks the missing texts up as it meets them and encodes them
    a shard at a time, so no more texts are held than one shard per role. Under torchrun every rank encodes its
    share of the missing texts into its own pending shards; rank 0 commits them."""
    keys, pending = scan.keys, cache.pending_keys()
    group.barrier()  # every rank has read pending/ before any rank adds to it
    missing = cache.find(keys) < 0
    if len(pending):  # texts a killed run (or another rank) already encoded
        missing &= index_in(keys, pending) < 0
    missing = np.flatnonzero(missing)
    summary.unique_texts, summary.cached = len(keys), len(keys) - len(missing)
    if len(missing):
        encoder = Encoder.load(config.encoder, info)
        limits = {"context": config.encoder.max_context_tokens, "module": config.encoder.max_module_tokens}
        start, encoded, tokens = time.perf_counter(), 0, 0
        mine = np.zeros(len(keys), dtype=bool)  # this rank's texts not yet met on pass two
        mine[rank_share(missing, scan.lengths[missing], keys, limits, group)] = True
        waiting: dict[str, list[tuple[int, str, str]]] = {"context": [], "module": []}  # (position, text, head)

        def flush(role: str) -> None:
            nonlocal encoded, tokens
            shard = _encode_shard(encoder, keys, waiting[role], role, progress and group.is_main)
            cache.add_shard(shard, group.rank)
            encoded, tokens = encoded + len(shard.keys), tokens + int(shard.n_tokens.sum())
            waiting[role] = []

        changed = ModrmError("the pairs changed while they were being embedded (a file rewritten?); run embed again")
        for n, pair in enumerate(pairs):
            if n == scan.n_pairs:
                raise changed
            head = config.encoder.context_head(pair.task)  # what truncation of a context keeps
            for role, text, position in zip(
                ROLES, texts_of(pair, config.encoder), scan.positions[n].tolist(), strict=True
            ):
                if mine[position]:
                    mine[position] = False
                    if text_key(role, text) != keys[position].tobytes():
                        raise changed
                    waiting[role].append((position, text, head))
                    if len(waiting[role]) == SHARD_TEXTS:
                        flush(role)
        if mine.any():
            raise changed
        for role, texts in waiting.items():
            if texts:
                flush(role)
        counts = group.gather((encoded, tokens, encoder.fallback_texts))
        summary.seconds = time.perf_counter() - start
        summary.encoded, summary.tokens, summary.fp32_fallbacks = map(sum, zip(*counts, strict=True))
    group.barrier()  # every rank's shards are written
    if group.is_main:
        cache.commit(keys)
    group.barrier()  # the commit is visible
    if not group.is_main:
        cache.reload()
    rows = cache.rows(keys)  # one lookup in the cache's index; the columns map through it
    summary.truncated = int(cache.texts["truncated"][rows].sum())
    return {column: rows[scan.positions[:, k]] for k, column in enumerate(ROW_COLUMNS)}


def rank_share(
    positions: np.ndarray, lengths: np.ndarray, keys: np.ndarray, limits: dict[str, int], group: Group
) -> np.ndarray:
    """This rank's share of `positions`, the same split on every rank, balanced by estimated tokens (characters /
    4, capped at the role's limit): longest first, dealt out back and forth (0, 1, ..., N-1, N-1, ..., 0, ...)."""
    if not group.distributed:
        return positions
    cap = np.array([limits[role] for role in ROLE_NAMES], dtype=np.int64)[roles_of(keys[positions])]
    cost = np.minimum(lengths // 4 + 1, cap)
    order = np.argsort(-cost, kind="stable")
    lap, seat = np.divmod(np.arange(len(order)), group.world_size)
    rank = np.where(lap % 2 == 0, seat, group.world_size - 1 - seat)
    return positions[np.sort(order[rank == group.rank])]


def _encode_shard(
    encoder: Encoder, keys: np.ndarray, texts: list[tuple[int, str, str]], role: str, progress: bool
) -> Shard:
    tokens = encoder.tokenize([t for _, t, _ in texts], role, heads=[h for _, _, h in texts])
    embeddings = np.empty((len(texts), encoder.dim), dtype=np.float16)
    for index, emb in encoder.encode_tokenized(tokens, desc=f"embed {role}s", progress=progress):
        embeddings[index] = emb
    return Shard(keys[[p for p, _, _ in texts]], tokens.lengths, tokens.truncated, embeddings)


def pairs_table(scan: Scan, rows: dict[str, np.ndarray]) -> pa.Table:
    """The pairs index: the scanned columns with each pair's four cache rows."""
    table = scan.table
    at = table.column_names.index("pos_outcome")
    for column in ROW_COLUMNS:
        table = table.add_column(at, column, pa.array(rows[column]))
        at += 1
    return table


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

    Under torchrun, rank 0 holds the cache's lock and writes the index; every rank encodes a share."""
    group = Group.from_env(config.encoder.device)
    encoder = dataclasses.replace(config.encoder, device=group.device(config.encoder.device))  # cuda:LOCAL_RANK
    config = dataclasses.replace(config, encoder=encoder)
    pairs = PairFiles(paths, config.data.modules)
    scan = scan_pairs(pairs, config, progress and group.is_main)  # every problem is found here, before any write
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
    previous = cache.read_pairs() if (cache.folder / "pairs.parquet").exists() else None
    earlier_files = list(manifest.get("data_files", [])) if previous is not None else []
    if append and previous is not None:
        check_appendable(previous, scan.table, manifest, config, cache.folder)
    rows = ensure_embedded(pairs, scan, cache, config, info, summary, progress, group)
    table = pairs_table(scan, rows)
    if append and previous is not None:
        table = pa.concat_tables([previous.select(table.column_names), table])
        summary.index = f"appended {scan.n_pairs} pairs to the {len(previous)} already indexed"
    elif previous is not None and earlier_files != [str(p) for p in paths]:
        summary.index = (
            f"replaced: it held {len(previous)} pairs from {', '.join(earlier_files) or 'other files'} "
            "(--append keeps them)"
        )
    cache.write_pairs(table)
    splits = table.column("split").value_counts().to_pylist()
    counts = {c["values"]: c["counts"] for c in splits}
    summary.splits = {s: counts.get(s, 0) for s in ("train", "val", "test")}
    files = [*earlier_files, *map(str, paths)] if append else list(map(str, paths))
    earlier_sha = list(manifest.get("data_sha256", [])) if append and previous is not None else []
    write_manifest(cache, config, files, [*earlier_sha, *map(file_sha256, paths)], summary, len(table))
    return summary


def check_appendable(previous: pa.Table, new: pa.Table, manifest: dict, config: Config, folder: Path) -> None:
    """Appended pairs keep their ids distinct and are split as the indexed ones were."""
    built = manifest.get("config", {}).get("data", {})
    for key in ("train_fraction", "val_fraction", "split_seed"):
        if key in built and built[key] != getattr(config.data, key):
            raise ModrmError(
                f"{folder}: --append with data.{key} = {getattr(config.data, key)!r}, but the index was split with "
                f"{built[key]!r}; use the same setting, or embed without --append to replace the index"
            )
    clashes = new.column("pair_id").filter(pc.is_in(new.column("pair_id"), value_set=previous.column("pair_id")))
    if len(clashes):
        clash = clashes[0].as_py()
        raise ModrmError(
            f"{folder}: --append: pair_id {clash!r} is already in the pairs index; give distinct ids, or embed "
            "without --append to replace the index"
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
