"""Stage 0, part one: every unique text of the pairs, encoded once, into the cache.

Texts are deduplicated by content across all files, within each role (a context seen in ten pairs is encoded once),
only texts the cache lacks are encoded, and work is written in shards so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.atomic import write_json
from pipeline.cache import ROW_COLUMNS, Cache, Key, Shard, key_table, read_manifest
from pipeline.config import Config, EncoderConfig
from pipeline.data import Pair, assign_split, file_sha256, load_pairs
from pipeline.distributed import Group
from pipeline.encoder import Encoder, ModelInfo, describe
from pipeline.errors import ModrmError

SHARD_TEXTS = 4096  # texts per resumable shard: a kill loses at most this much work


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


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pair_texts(pairs: Sequence[Pair], encoder: EncoderConfig) -> dict[str, list[str]]:
    """The four texts of every pair; the context the encoder sees starts with the task."""
    return {
        "pos_ctx_row": [encoder.context_text(p.task, p.positive.context) for p in pairs],
        "pos_mod_row": [p.positive.module_text for p in pairs],
        "neg_ctx_row": [encoder.context_text(p.task, p.negative.context) for p in pairs],
        "neg_mod_row": [p.negative.module_text for p in pairs],
    }


def ensure_embedded(
    pairs: Sequence[Pair],
    cache: Cache,
    config: Config,
    info: ModelInfo,
    summary: EmbedSummary,
    progress: bool = True,
    group: Group = Group(),
) -> dict[str, np.ndarray]:
    """Cache rows of the four texts of every pair, encoding (and caching) only what the cache lacks. Under torchrun
    every rank encodes its share of the missing texts into its own pending shards; rank 0 commits them."""
    columns = pair_texts(pairs, config.encoder)
    heads = [config.encoder.context_head(p.task) for p in pairs]  # what truncation of a context keeps
    unique: dict[Key, tuple[str, str]] = {}  # first appearance order, so rows are the same however the run was split
    column_keys: dict[str, list[Key]] = {}
    for column, texts in columns.items():
        role = "context" if column.endswith("ctx_row") else "module"
        hashes = {t: text_hash(t) for t in dict.fromkeys(texts)}
        column_keys[column] = keys = [(role, hashes[t]) for t in texts]
        for key, text, head in zip(keys, texts, heads, strict=True):
            unique.setdefault(key, (text, head))
    keys, pending = list(unique), cache.pending_keys()
    asked = key_table(keys)  # once, in arrow, for every lookup in the cache and its commit
    missing = [k for k, row in zip(keys, cache.find(asked), strict=True) if row < 0 and k not in pending]
    summary.unique_texts, summary.cached = len(unique), len(unique) - len(missing)
    if missing:
        encoder = Encoder.load(config.encoder, info)
        start = time.perf_counter()
        encoded = tokens = 0
        for role in ("context", "module"):
            todo = [k for k in missing if k[0] == role]
            limit = config.encoder.max_context_tokens if role == "context" else config.encoder.max_module_tokens
            mine = rank_share(todo, [unique[k][0] for k in todo], limit, group)
            for lo in range(0, len(mine), SHARD_TEXTS):
                shard = _encode_shard(encoder, mine[lo : lo + SHARD_TEXTS], unique, role, progress and group.is_main)
                cache.add_shard(shard, group.rank)
                encoded, tokens = encoded + len(shard.keys), tokens + int(shard.n_tokens.sum())
        counts = group.gather((encoded, tokens, encoder.fallback_texts))
        summary.seconds = time.perf_counter() - start
        summary.encoded, summary.tokens, summary.fp32_fallbacks = map(sum, zip(*counts, strict=True))
    group.barrier()  # every rank's shards are written
    if group.is_main:
        cache.commit(asked)
    group.barrier()  # the commit is visible
    if not group.is_main:
        cache.reload()
    rows = cache.rows(asked)  # one lookup in the cache's index; the columns map through it
    summary.truncated = int(cache.texts["truncated"][rows].sum())
    row_of = dict(zip(keys, rows.tolist(), strict=True))
    return {
        column: np.fromiter((row_of[k] for k in ks), dtype=np.int64, count=len(ks))
        for column, ks in column_keys.items()
    }


def rank_share(keys: list[Key], texts: list[str], max_tokens: int, group: Group) -> list[Key]:
    """This rank's share of `keys`, the same split on every rank, balanced by estimated tokens (characters / 4,
    capped at the role's limit): longest first, dealt out back and forth (0, 1, ..., N-1, N-1, ..., 0, ...)."""
    if not group.distributed:
        return keys
    cost = np.minimum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) // 4 + 1, max_tokens)
    order = np.argsort(-cost, kind="stable")
    position = np.arange(len(order))
    lap, seat = np.divmod(position, group.world_size)
    rank = np.where(lap % 2 == 0, seat, group.world_size - 1 - seat)
    mine = np.sort(order[rank == group.rank])
    return [keys[i] for i in mine]


def _encode_shard(
    encoder: Encoder, keys: list[Key], texts: dict[Key, tuple[str, str]], role: str, progress: bool
) -> Shard:
    tokens = encoder.tokenize([texts[k][0] for k in keys], role, heads=[texts[k][1] for k in keys])
    embeddings = np.empty((len(keys), encoder.dim), dtype=np.float16)
    for index, emb in encoder.encode_tokenized(tokens, desc=f"embed {role}s", progress=progress):
        embeddings[index] = emb
    return Shard(keys, tokens.lengths, tokens.truncated, embeddings)


def pairs_table(pairs: Sequence[Pair], rows: dict[str, np.ndarray], config: Config) -> pa.Table:
    d = config.data
    return pa.table(
        {
            "pair_id": [p.pair_id for p in pairs],
            "target_module": [p.target_module for p in pairs],
            "task": [p.task for p in pairs],
            "group": [p.split_key for p in pairs],
            "split": [assign_split(p.split_key, d.train_fraction, d.val_fraction, d.split_seed) for p in pairs],
            **{column: rows[column] for column in ROW_COLUMNS},
            "pos_outcome": pa.array([p.positive.outcome for p in pairs], type=pa.float64()),
            "neg_outcome": pa.array([p.negative.outcome for p in pairs], type=pa.float64()),
        }
    )


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
    pairs = load_pairs(paths, config.data.modules)
    info = describe(config.encoder)
    opened = group.on_main(lambda: Cache.open(cache_dir, info.fingerprint, wait))  # the lock, and any repair
    cache = opened if opened is not None else Cache.read(cache_dir, info.fingerprint)
    try:
        summary = EmbedSummary(n_pairs=len(pairs))
        if group.is_main:
            summary = _index_pairs(paths, pairs, cache, config, info, summary, progress, append, group)
        else:
            ensure_embedded(pairs, cache, config, info, summary, progress, group)
        return summary
    finally:
        cache.close()


def _index_pairs(
    paths: Sequence[str | Path],
    pairs: Sequence[Pair],
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
        check_appendable(previous, pairs, manifest, config, cache.folder)
    rows = ensure_embedded(pairs, cache, config, info, summary, progress, group)
    table = pairs_table(pairs, rows, config)
    if append and previous is not None:
        table = pa.concat_tables([previous.select(table.column_names), table])
        summary.index = f"appended {len(pairs)} pairs to the {len(previous)} already indexed"
    elif previous is not None and earlier_files != [str(p) for p in paths]:
        summary.index = (
            f"replaced: it held {len(previous)} pairs from {', '.join(earlier_files) or 'other files'} "
            "(--append keeps them)"
        )
    cache.write_pairs(table)
    splits = table.column("split").to_pylist()
    summary.splits = {s: splits.count(s) for s in ("train", "val", "test")}
    files = [*earlier_files, *map(str, paths)] if append else list(map(str, paths))
    earlier_sha = list(manifest.get("data_sha256", [])) if append and previous is not None else []
    write_manifest(cache, config, files, [*earlier_sha, *map(file_sha256, paths)], summary, len(table))
    return summary


def check_appendable(previous: pa.Table, pairs: Sequence[Pair], manifest: dict, config: Config, folder: Path) -> None:
    """Appended pairs keep their ids distinct and are split as the indexed ones were."""
    built = manifest.get("config", {}).get("data", {})
    for key in ("train_fraction", "val_fraction", "split_seed"):
        if key in built and built[key] != getattr(config.data, key):
            raise ModrmError(
                f"{folder}: --append with data.{key} = {getattr(config.data, key)!r}, but the index was split with "
                f"{built[key]!r}; use the same setting, or embed without --append to replace the index"
            )
    indexed = set(previous.column("pair_id").to_pylist())
    clash = next((p.pair_id for p in pairs if p.pair_id in indexed), None)
    if clash is not None:
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
