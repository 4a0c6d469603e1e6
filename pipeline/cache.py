"""The embedding cache: a folder of immutable segments, grown in O(new texts), written by one process at a time.

    manifest.json                      the one commit point: format, segments (name, rows), encoder fingerprint,
                                       the pairs index's id, config, data files and their sha256, counts, versions
    embeddings/seg-000000.h5           dataset `embeddings`: float16 [rows, dim], contiguous (memory-mappable)
    texts.parquet/seg-000000.parquet   text_hash (sha256 hex), row, role, n_tokens, truncated of those rows
    pairs.parquet                      the pairs index: pair_id, ..., the four text rows (ROW_COLUMNS), outcomes
    pairs-<id>.parquet                 a committed pairs index not yet renamed to pairs.parquet (a kill between)
    pending/                           shards of a run not yet committed: id.json, shard-rRRR-NNNNNN.h5
    .lock                              held (flock) by the one writer

A run that adds texts writes one new segment, then manifest.json. Readers read manifest.json once, then the files
it lists. A kill at any instant leaves the last commit; the next writer commits the finished shards instead of
encoding them again, finishes the pairs index's rename, and removes what no commit lists. A text's key is its
role's byte and SHA-256 digest (33 bytes); the open holds every key of the cache in memory.
"""

from __future__ import annotations

import binascii
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write, write_json
from pipeline.data import SPLITS
from pipeline.encoder import Fingerprint
from pipeline.errors import ModrmError

FORMAT = 2
ROLES = ("context", "module")  # a key's first byte is its role's place here
KEY = pa.binary(33)
ROW_COLUMNS = ("pos_ctx_row", "pos_mod_row", "neg_ctx_row", "neg_mod_row")
TEXT_SCHEMA = pa.schema(
    {"text_hash": pa.string(), "row": pa.int64(), "role": pa.string(), "n_tokens": pa.int64(), "truncated": pa.bool_()}
)
PAIRS_ID = b"modrm_pairs"  # the pairs index's content id, in its parquet metadata and in the manifest
BLOCK = 1 << 16  # rows per parquet row group, and per block compact copies


def text_key(role: str, text: str) -> bytes:
    return bytes([ROLES.index(role)]) + hashlib.sha256(text.encode("utf-8")).digest()


def as_keys(raw: bytes | bytearray | np.ndarray) -> pa.FixedSizeBinaryArray:
    """Keys laid end to end, as one arrow array (no copy)."""
    return pa.FixedSizeBinaryArray.from_buffers(KEY, memoryview(raw).nbytes // 33, [None, pa.py_buffer(raw)])


def key_bytes(keys: pa.FixedSizeBinaryArray) -> np.ndarray:
    """uint8 [n, 33]: the keys' bytes (a view)."""
    return np.frombuffer(keys.buffers()[1], np.uint8)[keys.offset * 33 :][: len(keys) * 33].reshape(-1, 33)


def pack(roles: Sequence[str] | pa.Array, hashes: Sequence[str] | pa.Array) -> pa.FixedSizeBinaryArray:
    """Keys from role names and hex digests; ValueError names what is not a key."""
    codes = pc.index_in(pa.array(roles, pa.string()), value_set=pa.array(ROLES))
    if codes.null_count:
        raise ValueError(f"a role is not one of {', '.join(ROLES)}")
    try:
        fixed = pa.array(hashes, pa.string()).cast(pa.binary(64))
        digests = binascii.unhexlify(memoryview(fixed.buffers()[1])[fixed.offset * 64 :][: len(fixed) * 64])
    except (pa.ArrowInvalid, binascii.Error):
        raise ValueError("a text_hash is not 64 hex digits") from None
    out = np.empty((len(codes), 33), np.uint8)
    out[:, 0], out[:, 1:] = codes.to_numpy(zero_copy_only=False), np.frombuffer(digests, np.uint8).reshape(-1, 32)
    return as_keys(out)


def unpack(keys: pa.FixedSizeBinaryArray) -> tuple[pa.Array, pa.Array]:
    """The role names and hex digests (strings) of keys."""
    raw = key_bytes(keys)
    digits = pa.py_buffer(binascii.hexlify(np.ascontiguousarray(raw[:, 1:])))
    hashes = pa.FixedSizeBinaryArray.from_buffers(pa.binary(64), len(raw), [None, digits]).cast(pa.string())
    return pc.take(pa.array(ROLES), pa.array(raw[:, 0])), hashes


def damaged(folder: Path, what: str) -> ModrmError:
    """A cache file that a kill cannot produce (every write is atomic): damaged from outside, so not trusted."""
    return ModrmError(f"cache {folder} is damaged ({what}); remove it (rm -r {folder}) and run `modrm embed` again")


def plain(path: Path) -> Path:
    """`path`, refused if a symbolic link: modrm never writes, replaces or deletes what a link in a cache points to."""
    if path.is_symlink():
        raise ModrmError(f"{path}: is a symbolic link; a cache holds only plain files and folders: replace it")
    return path


def lock_writer(folder: Path, wait: bool = True) -> TextIO:
    """The one writer's flock on `.lock`, held until the handle is closed or the process dies (so never stale); across
    nodes where the shared filesystem supports flock."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.fdopen(os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as err:
        raise ModrmError(f"{folder / '.lock'}: cannot open the writer's lock ({err.strerror}); remove it") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "?"
        if not wait:
            handle.close()
            raise ModrmError(
                f"{folder}: another modrm (pid {holder}) is writing this cache (drop --no-wait to queue)"
            ) from None
        print(f"{folder}: waiting for another modrm (pid {holder}) writing this cache ...", file=sys.stderr)
        fcntl.flock(handle, fcntl.LOCK_EX)
    handle.seek(0)
    handle.truncate()
    print(os.getpid(), file=handle, flush=True)
    return handle


@dataclass(frozen=True)
class Segment:
    name: str
    start: int  # its first row in the cache
    rows: int
    h5: Path
    texts: Path


@dataclass
class Shard:
    """Texts encoded but not yet committed (or, without embeddings, a segment's texts index)."""

    keys: pa.FixedSizeBinaryArray
    n_tokens: np.ndarray
    truncated: np.ndarray
    embeddings: np.ndarray | None = None  # float16 [n, dim]


class Cache:
    """The committed state of a cache folder (what manifest.json lists), and for a writer its lock."""

    def __init__(self, folder: str | Path, fingerprint: Fingerprint | None = None, lock: TextIO | None = None):
        self.folder, self.lock = Path(folder), lock
        self.manifest = read_manifest(self.folder) or {}
        try:
            built = Fingerprint(**self.manifest["encoder"]) if self.manifest else None
        except (KeyError, TypeError) as err:
            raise damaged(self.folder, f"manifest.json has no valid encoder fingerprint ({err!r})") from None
        if fingerprint is None and built is None:
            raise ModrmError(f"{folder}: not an embedding cache (no manifest.json); run `modrm embed` first")
        if differences := built.differences(fingerprint) if built and fingerprint else []:
            raise ModrmError(
                f"{folder}: cache was built with a different encoder setting ({'; '.join(differences)}); "
                "use the same encoder settings or another --cache folder"
            )
        self.fingerprint = fingerprint or built
        for name in ("embeddings", "texts.parquet", "pending"):
            plain(self.folder / name)  # never a read, a glob or a removal through a link
        self.segments = self._listed_segments()
        self.keys = pa.concat_arrays([pa.array([], KEY), *map(self._segment_keys, self.segments)])
        if pc.count_distinct(self.keys).as_py() != len(self.keys):
            raise damaged(self.folder, "a text is listed twice")

    @classmethod
    def open(cls, folder: str | Path, fingerprint: Fingerprint | None = None, wait: bool = True) -> Cache:
        """The cache to write (locked till `close()`), cleared of what a killed writer left; None: its own encoder."""
        read_manifest(folder)  # a file, a link or another format is refused before anything is created
        lock = lock_writer(Path(folder), wait)
        try:
            cache = cls(folder, fingerprint, lock)
            cache._tidy()
        except BaseException:
            lock.close()
            raise
        return cache

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_rows(self) -> int:
        return len(self.keys)

    def _segment(self, start: int, rows: int, name: str = "") -> Segment:
        """A listed segment, or (no name) the next one."""
        name = name or f"seg-{int(self.segments[-1].name[4:]) + 1 if self.segments else 0:06d}"
        h5, texts = self.folder / "embeddings" / f"{name}.h5", self.folder / "texts.parquet" / f"{name}.parquet"
        return Segment(name, start, rows, h5, texts)

    def _listed_segments(self) -> list[Segment]:
        try:
            listed = [(str(entry["name"]), int(entry["rows"])) for entry in self.manifest.get("segments", [])]
            if not all(re.fullmatch(r"seg-\d{6}", name) and rows > 0 for name, rows in listed):
                raise ValueError(listed)
        except (KeyError, TypeError, ValueError) as err:
            raise damaged(self.folder, f"manifest.json lists segments it cannot ({err!r})") from None
        starts = np.cumsum([0, *(rows for _, rows in listed)]).tolist()
        return [self._segment(start, rows, name) for (name, rows), start in zip(listed, starts, strict=False)]

    def _segment_keys(self, segment: Segment) -> pa.FixedSizeBinaryArray:
        """A segment's keys, checked: its embeddings and texts index (page checksums verified) hold its rows, whole."""
        dim = self.fingerprint.dim
        try:
            with h5py.File(plain(segment.h5), "r") as f:
                ds = f["embeddings"]
                shape, dtype, offset = ds.shape, ds.dtype, ds.id.get_offset()
            whole = offset is not None and segment.h5.stat().st_size >= offset + segment.rows * dim * 2
            if shape != (segment.rows, dim) or dtype != np.float16 or not whole:
                raise ValueError(f"embeddings {shape} {dtype}, listed {segment.rows} rows of dim {dim}")
            with pq.ParquetFile(plain(segment.texts), page_checksum_verification=True) as texts:
                if texts.metadata.num_rows != segment.rows:
                    raise ValueError(f"texts index of {texts.metadata.num_rows} rows, listed {segment.rows}")
                blocks = texts.iter_batches(BLOCK, columns=["role", "text_hash"])
                return pa.concat_arrays([pa.array([], KEY), *(pack(b.column(0), b.column(1)) for b in blocks)])
        except (OSError, KeyError, ValueError, pa.ArrowException) as err:
            raise damaged(self.folder, f"{segment.name}: {err}") from None

    def _tidy(self) -> None:
        """Finish a committed pairs index's rename; remove what no commit lists, and pending shards none can take."""
        staged = self.folder / f"pairs-{self.manifest.get('pairs')}.parquet"
        if "pairs" in self.manifest and plain(staged).exists():
            os.replace(staged, self.folder / "pairs.parquet")
        listed = {p for s in self.segments for p in (s.h5, s.texts)}
        for pattern in (".*.tmp-*", "pairs-*.parquet", "embeddings/*", "texts.parquet/*", "pending/.*.tmp-*"):
            for path in set(self.folder.glob(pattern)) - listed:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if (self.folder / "pending").exists() and self._pending_id() in (None, self.manifest.get("pending")):
            shutil.rmtree(self.folder / "pending")

    def _pending_id(self) -> str | None:
        """The id of the run that left pending/, if it is one of this encoder's."""
        try:
            found = json.loads(plain(self.folder / "pending" / "id.json").read_text())
            return None if Fingerprint(**found["encoder"]).differences(self.fingerprint) else str(found["id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _shard_paths(self) -> list[Path]:  # in a fixed order
        return sorted((self.folder / "pending").glob("shard-*.h5"))

    def pending_keys(self) -> pa.FixedSizeBinaryArray:
        """Texts that a killed run (or another rank) finished: a shard counts once its file exists."""
        return pa.concat_arrays([pa.array([], KEY), *(self._read_shard(p).keys for p in self._shard_paths())])

    def add_shard(self, shard: Shard, rank: int = 0) -> None:
        pending = self.folder / "pending"
        if not (pending / "id.json").exists():
            pending.mkdir(exist_ok=True)
            write_json(pending / "id.json", {"id": uuid.uuid4().hex, "encoder": self.fingerprint.to_dict()})

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f["keys"], f["n_tokens"], f["truncated"] = key_bytes(shard.keys), shard.n_tokens, shard.truncated
                f["embeddings"] = shard.embeddings

        number = len(list(pending.glob(f"shard-r{rank:03d}-*.h5")))
        atomic_write(pending / f"shard-r{rank:03d}-{number:06d}.h5", write)

    def _read_shard(self, path: Path, embeddings: bool = False) -> Shard:
        try:
            with h5py.File(plain(path), "r") as f:
                keys, n_tokens, truncated, stored = f["keys"][:], f["n_tokens"][:], f["truncated"][:], f["embeddings"]
                vectors, sizes = (
                    stored[:] if embeddings else None,
                    {len(keys), len(n_tokens), len(truncated), len(stored)},
                )
                if len(sizes) > 1 or keys.shape[1:] != (33,) or stored.shape[1:] != (self.fingerprint.dim,):
                    raise ValueError("its keys, counts and embeddings disagree")
        except (OSError, KeyError, ValueError) as err:
            damage = f"an unfinished run's shard is damaged ({err})"
            raise ModrmError(f"{path}: {damage}; remove {path.parent} (its texts are encoded again)") from None
        return Shard(as_keys(keys), n_tokens, truncated, vectors)

    def commit(self, order: pa.Array, pairs: pa.RecordBatchReader | None = None, manifest: dict | None = None) -> int:
        """The pending shards as one new segment (`order`'s texts first, then the others as met, each once), `pairs` as
        the pairs index and `manifest`'s entries: one write of manifest.json makes them visible. Returns rows added."""
        assert self.lock is not None, "commit needs the writer's lock (Cache.open)"
        shards, before = self._shard_paths(), self.n_rows
        if len(order) and not shards:
            raise ModrmError(f"{self.folder}: {len(order)} texts are to be committed, but no shard holds them")
        segment, keys = self._write_segment(order, shards) if shards else (None, pa.array([], KEY))
        update = (manifest or {}) | (self._stage_pairs(pairs) if pairs is not None else {})
        if segment is None and not update:
            return 0
        added = [segment] if segment else []
        self._write_manifest([*self.segments, *added], update | {"pending": self._pending_id()})
        self.keys = pa.concat_arrays([self.keys, keys])
        self._tidy()
        return self.n_rows - before

    def _write_manifest(self, segments: list[Segment], update: dict) -> None:
        self.segments, listed = segments, [{"name": s.name, "rows": s.rows} for s in segments]
        self.manifest = self.manifest | update | {"format": FORMAT, "encoder": self.fingerprint.to_dict()}
        self.manifest |= {"segments": listed, "n_texts": sum(s.rows for s in segments)}
        write_json(self.folder / "manifest.json", self.manifest)

    def _write_segment(self, order: pa.Array, paths: list[Path]) -> tuple[Segment, pa.Array]:
        """The next segment from the shards: each text's first copy, `order`'s first, scattered shard by shard."""
        shards = [self._read_shard(path) for path in paths]
        keys = pa.concat_arrays([pa.array([], KEY), *(s.keys for s in shards)])
        listed = pc.index_in(order, value_set=keys)
        if listed.null_count:
            raise ModrmError(f"{self.folder}: a text is to be committed but no pending shard has it")
        first = pc.index_in(keys, value_set=keys).to_numpy() == np.arange(len(keys))
        others = first & ~pc.is_in(keys, value_set=order).to_numpy(zero_copy_only=False)
        source = np.concatenate([listed.to_numpy(), np.flatnonzero(others)])
        bounds = np.cumsum([0, *(len(s.keys) for s in shards)])
        of_shard = np.searchsorted(bounds, source, side="right") - 1

        def fill(out: np.memmap) -> None:
            for s, path in enumerate(paths):
                if len(rows := np.flatnonzero(of_shard == s)):
                    block = self._read_shard(path, embeddings=True).embeddings[source[rows] - bounds[s]]
                    if not np.isfinite(block).all():
                        raise ModrmError(f"{path}: non-finite embeddings; refusing to write them to the cache")
                    out[rows] = block
                    release(out)

        column = lambda name: np.concatenate([getattr(s, name) for s in shards])[source]  # noqa: E731
        texts = Shard(keys.take(pa.array(source)), column("n_tokens"), column("truncated"))
        segment = self._segment(self.n_rows, len(source))
        self._write_segment_files(segment, texts, fill)
        return segment, texts.keys

    def _write_segment_files(self, segment: Segment, texts: Shard, fill: Callable[[np.memmap], None]) -> None:
        """A segment's embeddings (contiguous float16, `fill`ed through a memory map) and texts index (checksummed)."""
        dim = self.fingerprint.dim

        def write_h5(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("embeddings", shape=(segment.rows, dim), dtype=np.float16)
                ds[segment.rows - 1] = 0  # allocates the contiguous storage
                offset = ds.id.get_offset()
            fill(np.memmap(tmp, np.float16, "r+", offset=offset, shape=(segment.rows, dim)))

        def write_texts(tmp: Path) -> None:
            with pq.ParquetWriter(tmp, TEXT_SCHEMA, write_page_checksum=True) as out:
                for lo in range(0, segment.rows, BLOCK):
                    roles, hashes = unpack(texts.keys.slice(lo, BLOCK))
                    row = np.arange(segment.start + lo, segment.start + lo + len(roles))
                    block = [hashes, row, roles, texts.n_tokens[lo : lo + BLOCK], texts.truncated[lo : lo + BLOCK]]
                    out.write_table(pa.table(block, schema=TEXT_SCHEMA))

        atomic_write(segment.h5, write_h5)
        atomic_write(segment.texts, write_texts)

    def _stage_pairs(self, pairs: pa.RecordBatchReader) -> dict:
        """Write the pairs index under a name of its content id, which the manifest will name; its counts."""
        digest, splits = hashlib.sha256(), Counter()

        def write(tmp: Path) -> None:
            with pq.ParquetWriter(tmp, pairs.schema) as out:
                for batch in pairs:
                    out.write_batch(batch)
                    digest.update(batch.serialize())
                    splits.update({c["values"]: c["counts"] for c in pc.value_counts(batch["split"]).to_pylist()})
                out.add_key_value_metadata({PAIRS_ID: digest.hexdigest()[:32]})

        staged = atomic_write(self.folder / "pairs-new.parquet", write)
        pairs_id = digest.hexdigest()[:32]
        os.replace(staged, self.folder / f"pairs-{pairs_id}.parquet")
        return {"pairs": pairs_id, "n_pairs": sum(splits.values()), "splits": {s: splits[s] for s in SPLITS}}

    def compact(self) -> int:
        """Merge the segments into one, committed as a run's is (old maps stay readable). Returns how many merged."""
        assert self.lock is not None, "compact needs the writer's lock (Cache.open)"
        if len(old := self.segments) < 2:
            return 0
        source = self.embeddings(memory_budget_bytes=0)

        def fill(out: np.memmap) -> None:
            for lo in range(0, self.n_rows, BLOCK):
                out[lo : lo + BLOCK] = source[lo : lo + BLOCK]
                release(out, *source.maps)

        columns = self.text_columns(np.arange(self.n_rows), ["n_tokens", "truncated"])
        segment = self._segment(0, self.n_rows)
        self._write_segment_files(segment, Shard(self.keys, columns["n_tokens"], columns["truncated"]), fill)
        self._write_manifest([segment], {})
        self._tidy()
        return len(old)

    def find(self, keys: pa.Array) -> np.ndarray:
        """Each key's row, -1 where the cache lacks it: the cache's keys probed against a table of the asked."""
        place = pc.index_in(self.keys, value_set=keys)  # each cached key's (first) place among the asked
        row = np.full(len(keys), -1, np.int64)
        row[place.drop_null().to_numpy()] = np.flatnonzero(place.is_valid().to_numpy(zero_copy_only=False))
        return row[pc.index_in(keys, value_set=keys).to_numpy()]  # a key asked again: its first place's row

    def text_columns(self, rows: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """`columns` of the texts index at `rows`."""
        try:
            whole = [pq.read_table(s.texts, columns=list(columns)) for s in self.segments]
        except (OSError, ValueError, pa.ArrowException) as err:
            raise damaged(self.folder, f"the texts index is unreadable ({err})") from None
        whole = pa.concat_tables([TEXT_SCHEMA.empty_table().select(list(columns)), *whole])
        return {c: whole.column(c).to_numpy()[np.asarray(rows, np.int64)] for c in columns}

    def embeddings(self, memory_budget_bytes: float = float("inf")) -> np.ndarray | MappedRows:
        """float16 [n_rows, dim]: read into memory, or memory-mapped segment by segment when over the budget."""
        if not self.segments:
            raise ModrmError(f"{self.folder}: holds no embeddings; run `modrm embed` first")
        maps, dim = [], self.fingerprint.dim
        for s in self.segments:
            with h5py.File(s.h5, "r") as f:
                maps.append(np.memmap(s.h5, np.float16, "r", f["embeddings"].id.get_offset(), (s.rows, dim)))
        if self.n_rows * dim * 2 > memory_budget_bytes:
            return MappedRows(maps)
        whole = np.concatenate(maps)
        release(*maps)
        return whole

    def check_finite(self, block: np.ndarray) -> None:
        """Refuse embeddings that are not finite (a commit never writes them: they were damaged since)."""
        if not np.isfinite(block).all():
            raise ModrmError(f"{self.folder}: non-finite values in the cache's embeddings; embed into a fresh --cache")

    def pairs_path(self) -> Path:
        """The pairs index the manifest names: pairs.parquet, or its staged name until a writer renames it."""
        if "pairs" not in self.manifest:
            raise ModrmError(f"{self.folder}: no pairs index; run `modrm embed --data FILE --cache {self.folder}`")
        staged = self.folder / f"pairs-{self.manifest['pairs']}.parquet"
        return staged if staged.exists() else self.folder / "pairs.parquet"

    def read_pairs(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The pairs index, checked; `columns`: those and the row columns, the few-valued ones as dictionaries."""
        path = self.pairs_path()
        try:
            missing = {*ROW_COLUMNS, "pair_id", "target_module", "task", "split"} - set(pq.read_schema(path).names)
            if missing:
                raise KeyError(f"no column {', '.join(sorted(missing))}")
            wanted = None if columns is None else list(dict.fromkeys([*ROW_COLUMNS, *columns]))
            few_valued = [c for c in ("target_module", "split") if wanted is not None and c in wanted]
            table = pq.read_table(path, columns=wanted, read_dictionary=few_valued)
            bounds = [pc.min_max(table.column(c)).as_py() for c in ROW_COLUMNS]
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            raise damaged(self.folder, f"{path.name} is unreadable ({err})") from None
        nulls = any(table.column(c).null_count for c in ROW_COLUMNS)
        if len(table) and (nulls or any(b["min"] < 0 or b["max"] >= self.n_rows for b in bounds)):
            raise damaged(self.folder, f"{path.name} points at rows the cache does not have")
        return table


class MappedRows:
    """Memory-mapped segments indexed as one [n_rows, dim] array: `rows[idx]` gathers from each segment."""

    def __init__(self, maps: list[np.memmap]):
        self.maps, self.starts = maps, np.cumsum([0] + [len(m) for m in maps])
        self.shape, self.dtype = (int(self.starts[-1]), maps[0].shape[1]), maps[0].dtype

    def __getitem__(self, rows: np.ndarray | slice) -> np.ndarray:
        rows = np.arange(*rows.indices(self.shape[0])) if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        segment = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        for s in np.unique(segment):
            out[segment == s] = self.maps[s][rows[segment == s] - self.starts[s]]
        return out


def release(*maps: np.memmap) -> None:
    """Write back and drop memory maps' pages from this process (the kernel keeps them cached): one block at a time."""
    for array in maps:
        array.flush()
        array._mmap.madvise(mmap.MADV_DONTNEED)


def read_manifest(folder: str | Path) -> dict | None:
    """manifest.json, of this modrm's format (another format is refused, unread); None before the first commit."""
    folder, path = Path(folder), Path(folder) / "manifest.json"
    if folder.exists() and not folder.is_dir():
        raise ModrmError(f"{folder}: is a file; --cache names a folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8")) if plain(path).exists() else None
    except (OSError, ValueError) as err:
        raise damaged(folder, f"manifest.json is not valid JSON ({err})") from None
    if manifest is None and not (folder / "embeddings.h5").exists():  # the layout before this format had one
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModrmError(
            f"{folder}: a cache in another modrm format (this modrm reads format {FORMAT}); embed again into a fresh "
            "folder (another --cache, or remove this one)"
        )
    return manifest


def open_existing(folder: str | Path) -> tuple[Cache, dict]:
    """A cache for reading only (train-heads): its own manifest is the fingerprint."""
    cache = Cache(folder)
    return cache, cache.manifest
