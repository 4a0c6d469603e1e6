"""The embedding cache: one folder per encoder fingerprint, grown in O(new) and written by one process at a time.

    embeddings.h5          the commit point: a virtual dataset `embeddings`, float16 [n_texts, dim], over the
                           segments, and (attributes) the segment list and the encoder fingerprint
    segments/seg-N.h5      immutable: contiguous float16 [rows, dim] (so each can be memory-mapped)
    segments/seg-N.parquet immutable: text_hash, row, role, n_tokens, truncated of those rows
    segments/seg-N.keys.npy     immutable: the segment's keys (33 bytes: role, SHA-256), sorted, and beside each
    segments/seg-N.keyrows.npy  its row in the segment and whether it was truncated: searched in place (mapped)
    texts.parquet/         a view for pandas and pyarrow: links to the segments' parquet files, one per segment
    pairs.parquet          pair_id, target_module, task, group, split, pos/neg ctx/mod rows, pos/neg outcome
    manifest.json          the encoder fingerprint, dtype, counts, versions
    pending/               shards of an unfinished run, per rank: kept across a kill, committed by the next run;
                           id.json names the folder, and the commit point the one it took in
    .lock                  held (flock) by the one process writing the cache

Adding N texts writes one new segment of N rows and replaces the small embeddings.h5: nothing already stored is
read or copied. Which of N texts the cache holds is a binary search of each segment's sorted keys, in place: the
open and the lookup read O(N log M) of a cache of M rows, never its whole index. A run killed at any instant leaves
the last commit intact; the next writer deletes what no commit lists (and a pending/ that the last commit took in)
and commits the finished shards instead of encoding them again. Readers take the segment list from embeddings.h5
once and then only read immutable files, so they never see half a commit.

A cache from before segments (one contiguous embeddings.h5 and a texts.parquet file) still opens; its first new
commit turns the old file into segment 0 by a hard link, copying nothing.
"""

from __future__ import annotations

import fcntl
import io
import json
import mmap
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write, write_json
from pipeline.encoder import Fingerprint
from pipeline.errors import ModrmError
from pipeline.keys import BUCKETS, KEY, Key, as_keys, bucket, index_in, pack, unpack
from pipeline.spill import Spill, records

TEXT_COLUMNS = ("text_hash", "row", "role", "n_tokens", "truncated")
TEXT_SCHEMA = pa.schema(
    [
        ("text_hash", pa.string()),
        ("row", pa.int64()),
        ("role", pa.string()),
        ("n_tokens", pa.int64()),
        ("truncated", pa.bool_()),
    ]
)
ROW_COLUMNS = ("pos_ctx_row", "pos_mod_row", "neg_ctx_row", "neg_mod_row")
SEGMENTS_KEY, FINGERPRINT_KEY = "modrm_segments", "modrm_fingerprint"
COMMITTED_PENDING_KEY = "modrm_committed_pending"  # the id of the pending/ folder the last commit took in
COPY_ROWS = 1 << 14  # rows per block when compact copies the segments into one (32 MiB at dim 1024)
INDEX_ROWS = 1 << 16  # rows per row group of a segment's texts index, written and read a group at a time
SHARD_TEXT = np.dtype(  # a commit's record of a shard's text, on disk: where it is, where it goes, its index entry
    [
        ("shard", np.int64),
        ("index", np.int64),
        ("row", np.int64),
        ("key", KEY),
        ("n_tokens", np.int64),
        ("truncated", np.bool_),
    ]
)
LISTED_TEXT = np.dtype([("key", KEY), ("row", np.int64)])
INDEX_ENTRY = np.dtype([("key", KEY), ("row", np.int64), ("n_tokens", np.int64), ("truncated", np.bool_)])
KEY_ROW = np.dtype([("row", np.int64), ("truncated", np.bool_)])  # seg-N.keyrows.npy; and what Cache.find returns


@dataclass
class Shard:
    """Embeddings of some texts, encoded but not yet committed to the cache."""

    keys: np.ndarray  # KEY (or anything `as_keys` takes)
    n_tokens: np.ndarray
    truncated: np.ndarray
    embeddings: np.ndarray  # float16

    def __post_init__(self) -> None:
        self.keys = as_keys(self.keys)


@dataclass(frozen=True)
class Segment:
    """Rows [start, start + rows) of the cache: their embeddings file and (None for an old cache) texts file."""

    h5: Path
    texts: Path | None
    start: int
    rows: int
    texts_bytes: int | None = None  # the texts index's size as its commit wrote it (None: from an older modrm)

    @property
    def sorted_keys(self) -> tuple[Path, Path]:
        return _sorted_paths(self.h5.with_suffix(""))


def damaged(folder: Path, what: str) -> ModrmError:
    """A cache file that a kill cannot produce (every write is atomic): damaged from outside, so not trusted."""
    return ModrmError(
        f"{folder}: {what}; this cache cannot be trusted: remove it (rm -r {folder}) and run `modrm embed` again"
    )


# ---------------------------------------------------------------------------------------------- the lock


class WriterLock:
    """One writer per cache folder: an exclusive flock on `.lock`, released by the kernel when its process dies
    (so a killed writer never leaves a stale lock). Works across nodes where the shared filesystem supports
    flock (NFSv4, Lustre and GPFS with their lock options)."""

    def __init__(self, folder: Path, wait: bool = True):
        folder.mkdir(parents=True, exist_ok=True)
        self.handle = (folder / ".lock").open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "?"
            if not wait:
                self.handle.close()
                raise ModrmError(
                    f"{folder}: another modrm (pid {holder}) is writing this cache; wait for it, or run without "
                    "--no-wait to queue behind it"
                ) from None
            print(f"{folder}: waiting for another modrm (pid {holder}) writing this cache ...", file=sys.stderr)
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


# ---------------------------------------------------------------------------------------------- the cache


class Cache:
    """The committed state of a cache folder: its segments, the texts they hold, and (for a writer) the lock."""

    def __init__(self, folder: str | Path, fingerprint: Fingerprint, lock: WriterLock | None = None):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.lock = lock
        self.reload()

    def reload(self) -> None:
        """Read the last commit (another rank's, after a barrier): the segment list, and each segment's sorted keys
        mapped (checked, not read)."""
        self._sorted: dict[Path, tuple[np.ndarray, np.ndarray]] = {}  # by segment: its keys sorted, their KEY_ROW
        self.segments = self._read_segments()

    # -------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, folder: str | Path, fingerprint: Fingerprint, wait: bool = True) -> Cache:
        """Open (or start) a cache to write: take the lock, finish or discard what a killed writer left, and
        refuse a cache built by a different encoder, naming what differs. `close()` releases the lock."""
        folder = Path(folder)
        lock = WriterLock(folder, wait)
        try:
            manifest = read_manifest(folder) or _committed_manifest(folder)
            if manifest is not None:
                check_fingerprint(folder, manifest, fingerprint)
            cache = cls(folder, fingerprint, lock)
            cache._tidy()
        except BaseException:
            lock.release()
            raise
        return cache

    @classmethod
    def read(cls, folder: str | Path, fingerprint: Fingerprint) -> Cache:
        """The committed cache, for reading or for writing pending shards under another process's lock."""
        return cls(folder, fingerprint)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tidy(self) -> None:
        """The writer's duty: remove interrupted writes and uncommitted segments, publish the texts view, and drop
        pending shards of another encoder (they can never be committed here)."""
        for pattern in (".*.tmp-*", "segments/.*.tmp-*", "pending/.*.tmp-*"):
            for stale in self.folder.glob(pattern):
                stale.unlink()
        listed = {p for s in self.segments for p in (s.h5, s.texts, *s.sorted_keys)}
        for path in self.folder.glob("segments/seg-*"):
            if path not in listed:
                path.unlink()
        if self._segmented():
            for segment in self.segments:
                if segment.h5 not in self._sorted:  # written by a modrm from before sorted keys: once, now
                    _write_sorted_keys(segment.h5.with_suffix(""), segment.rows, self._read_index(segment))
                    self._check_segment(segment)
            self._publish_texts_view()
        pending = self.folder / "pending"
        if (pending / "fingerprint.json").exists() and _pending_differs(pending / "fingerprint.json", self.fingerprint):
            shutil.rmtree(pending)
        if self._pending() and _pending_id(pending) in (None, self.committed_pending):
            shutil.rmtree(pending)  # committed by a run killed before it removed them (or of unknown origin)

    @property
    def n_rows(self) -> int:
        return sum(segment.rows for segment in self.segments)

    def _read_segments(self) -> list[Segment]:
        """The committed segments: embeddings.h5's list, or the whole old-style file as one segment."""
        path = self.folder / "embeddings.h5"
        self.committed_pending: str | None = None
        if not path.exists():  # a new cache, or one whose first commit a kill prevented; or a damaged one
            view = self.folder / "texts.parquet"
            if (view.is_dir() and any(view.iterdir())) or (view.is_file() and _old_texts_rows(self.folder)):
                raise damaged(self.folder, "embeddings.h5 is missing, but texts.parquet lists rows")
            return []
        try:
            with h5py.File(path, "r") as f:
                listed = f.attrs.get(SEGMENTS_KEY)
                self.committed_pending = f.attrs.get(COMMITTED_PENDING_KEY)
        except (OSError, ValueError) as err:
            raise damaged(self.folder, f"embeddings.h5 is unreadable ({err})") from None
        if listed is None:  # a cache from before segments: its one file, indexed by a texts.parquet file
            old_texts = self.folder / "texts.parquet"
            segments = [Segment(path, None, 0, _old_texts_rows(self.folder))] if old_texts.is_file() else []
        else:
            try:
                segments = _segments(self.folder, [_listed(entry) for entry in json.loads(listed)])
            except (TypeError, ValueError, IndexError) as err:
                raise damaged(self.folder, f"embeddings.h5's segment list is unreadable ({err})") from None
        for segment in segments:
            self._check_segment(segment)
        return segments

    def _check_segment(self, segment: Segment) -> None:
        """Its file holds its rows at the fingerprint's dimension, all of their bytes."""
        what = segment.h5.relative_to(self.folder)
        if not segment.h5.is_file():
            raise damaged(self.folder, f"{what} is missing")
        try:
            with h5py.File(segment.h5, "r") as f:
                ds = f["embeddings"]
                shape, offset = ds.shape, ds.id.get_offset()
        except (OSError, KeyError, ValueError) as err:
            raise damaged(self.folder, f"{what} is unreadable ({err})") from None
        if len(shape) != 2 or shape[0] < segment.rows or shape[1] != self.fingerprint.dim:
            raise damaged(
                self.folder, f"{what} holds {shape}, but {segment.rows} rows of dim {self.fingerprint.dim} are listed"
            )
        if offset is not None and segment.h5.stat().st_size < offset + shape[0] * shape[1] * 2:
            raise damaged(self.folder, f"{what} is truncated ({segment.h5.stat().st_size:,} bytes)")
        if segment.texts is not None:
            self._check_texts(segment)

    def _check_texts(self, segment: Segment) -> None:
        """Its texts index: a parquet footer listing its rows, of the size its commit wrote; its sorted keys (absent
        in a segment of an older modrm, which are read from the index), mapped. O(1): the rows are not read."""
        what = segment.texts.relative_to(self.folder)
        try:
            listed = pq.read_metadata(segment.texts)
        except (OSError, ValueError, pa.ArrowException) as err:
            raise damaged(self.folder, f"the texts index is unreadable ({what}: {err})") from None
        if listed.num_rows != segment.rows or not set(TEXT_COLUMNS) <= set(listed.schema.names):
            raise damaged(self.folder, f"{what} lists {listed.num_rows} of its {segment.rows} rows, or lacks a column")
        size = segment.texts.stat().st_size
        if segment.texts_bytes is not None and size != segment.texts_bytes:
            raise damaged(self.folder, f"{what} is {size:,} bytes, but its commit wrote {segment.texts_bytes:,}")
        keys_path, rows_path = segment.sorted_keys
        if keys_path.is_file() and rows_path.is_file():
            rows = segment.rows
            self._sorted[segment.h5] = (
                self._map_sorted(keys_path, KEY, rows),
                self._map_sorted(rows_path, KEY_ROW, rows),
            )

    def _map_sorted(self, path: Path, dtype: np.dtype, rows: int) -> np.memmap:
        """A sorted keys file, mapped: exactly the .npy header modrm writes for `rows` of `dtype`, then the rows (the
        header is compared, never parsed)."""
        header = _npy_header(dtype, rows)
        try:
            with path.open("rb") as handle:
                found = handle.read(len(header))
            size = path.stat().st_size
        except OSError as err:
            raise damaged(self.folder, f"{path.relative_to(self.folder)} is unreadable ({err})") from None
        if found != header or size != len(header) + rows * dtype.itemsize:
            what = f"{path.relative_to(self.folder)} ({size:,} bytes)"
            raise damaged(self.folder, f"{what} is not the sorted keys of the segment's {rows:,} rows")
        return np.memmap(path, dtype=dtype, mode="r", offset=len(header), shape=(rows,))

    def _read_index(self, segment: Segment) -> Iterator[np.ndarray]:
        """A segment's texts index as INDEX_ENTRY records, a row group at a time, rows counted from the segment's
        start; checked (each text_hash 64 hex digits, the rows in order)."""
        path, done = segment.texts or self.folder / "texts.parquet", 0
        try:
            with pq.ParquetFile(path) as index:
                for batch in index.iter_batches(batch_size=INDEX_ROWS, columns=list(TEXT_COLUMNS)):
                    batch = batch.slice(0, segment.rows - done)
                    row = batch.column("row").to_numpy() - segment.start
                    if not np.array_equal(row, np.arange(done, done + len(batch))):
                        raise ValueError(f"{path.name}: its rows are not {segment.start}, {segment.start + 1}, ...")
                    keys = pack(batch.column("role"), batch.column("text_hash"))
                    numeric = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in ("n_tokens", "truncated")}
                    yield records(INDEX_ENTRY, key=keys, row=row, **numeric)
                    done += len(batch)
            if done < segment.rows:
                raise ValueError(f"{path.name} lists {done} of its {segment.rows} rows")
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            raise damaged(self.folder, f"the texts index is unreadable ({err})") from None

    # -------------------------------------------------------------------------------------- pending

    def pending_keys(self) -> np.ndarray:
        """Texts that a killed run (or another rank) finished; a shard counts once its index file exists."""
        return np.concatenate([np.empty(0, KEY), *(_read_shard_index(path)[0] for path, _ in self._pending())])

    def _pending(self) -> list[tuple[Path, Path]]:
        """(index, embeddings) of every finished shard, in a fixed order."""
        return [(p, p.with_suffix(".npy")) for p in sorted((self.folder / "pending").glob("shard-*.parquet"))]

    def add_shard(self, shard: Shard, rank: int = 0) -> None:
        """Write a shard to pending/ (its embeddings, then its index: the index makes it count)."""
        pending = self.folder / "pending"
        if not (pending / "fingerprint.json").exists():  # not `pending.exists()`: a kill may follow the mkdir
            pending.mkdir(parents=True, exist_ok=True)
            write_json(pending / "id.json", {"id": uuid.uuid4().hex})  # which commit took them in, at the next open
            write_json(pending / "fingerprint.json", self.fingerprint.to_dict())
        number = len(list(pending.glob(f"shard-r{rank:03d}-*.parquet")))
        stem = pending / f"shard-r{rank:03d}-{number:06d}"
        atomic_write(stem.with_suffix(".npy"), lambda tmp: _save_npy(tmp, shard.embeddings))
        spelled = unpack(shard.keys)
        table = pa.table(
            {
                **{c: spelled.column(c) for c in ("text_hash", "role")},
                "n_tokens": shard.n_tokens,
                "truncated": shard.truncated,
            }
        )
        atomic_write(stem.with_suffix(".parquet"), lambda tmp: pq.write_table(table, tmp))

    # -------------------------------------------------------------------------------------- commit

    def commit(self, order: Sequence[Key] | pa.Table | np.ndarray) -> int:
        """Commit every pending shard as one new segment: first the texts of `order` in its order (the texts new to
        the cache, in the caller's first appearance; each must be in a shard), then any other pending text (another
        run's) sorted by key; a text in two shards once, its first copy. So an interrupted or sharded run gives the
        rows of one uninterrupted run. Texts meet their rows by key a bucket at a time on disk (pipeline.spill) and
        rows are written a shard at a time: memory holds a bucket of keys and a shard, and a byte per text of
        `order` (which may be a memory map), however many texts are committed. Returns rows added."""
        if self.lock is None:
            raise RuntimeError("commit needs the writer's lock (Cache.open)")
        shards = self._pending()
        order = as_keys(order)
        with tempfile.TemporaryDirectory(prefix="modrm-commit-") as work:
            placed, added = self._place(shards, order, Path(work))
            if added:
                committed = self._adopt_old_file()
                number = int(committed[-1][0].removeprefix("seg-")) + 1 if committed else 0
                segments = [*committed, self._write_segment(number, shards, placed, added, Path(work))]
                self._write_commit(segments, _pending_id(self.folder / "pending"))
                self.reload()
        shutil.rmtree(self.folder / "pending", ignore_errors=True)
        if added:
            self._publish_texts_view()
            manifest = read_manifest(self.folder) or {}  # eval adds texts too: keep the counts true
            write_json(
                self.folder / "manifest.json",
                manifest | {"encoder": self.fingerprint.to_dict(), "n_texts": self.n_rows},
            )
        return added

    def _place(self, shards: list[tuple[Path, Path]], order: np.ndarray, work: Path) -> tuple[Spill, int]:
        """Where each shard text goes in the new segment (its SHARD_TEXT record with its row), by shard; and the
        segment's rows. A bucket of keys at a time: the shards' texts, deduplicated, meet `order`'s by key. None of
        them is committed already (pending/ goes at the next open once a commit took it in): so no lookup in the
        committed index, whose size would set the cost."""
        found = Spill(work / "found", SHARD_TEXT, BUCKETS)
        for number, (path, _) in enumerate(shards):
            keys, table = _read_shard_index(path, ["n_tokens", "truncated"])
            text = records(SHARD_TEXT, key=keys, shard=number, index=np.arange(len(keys)), row=-1)
            text["n_tokens"], text["truncated"] = (table.column(c).to_numpy() for c in ("n_tokens", "truncated"))
            found.add(bucket(keys), text)
        listed = Spill(work / "listed", LISTED_TEXT, BUCKETS)
        for lo in range(0, len(order), INDEX_ROWS):
            keys = np.array(order[lo : lo + INDEX_ROWS])
            listed.add(bucket(keys), records(LISTED_TEXT, key=keys, row=np.arange(lo, lo + len(keys))))
            if isinstance(order, np.memmap):
                _release_pages(order)  # of a memory map, one block's pages at a time
        placed = Spill(work / "placed", SHARD_TEXT, max(len(shards), 1))
        filled, rows = np.zeros(len(order), dtype=bool), len(order)
        for lo, hi in found.groups(INDEX_ROWS):
            texts = found.read(lo, hi)
            keys, first = np.unique(texts["key"], return_index=True)  # in key order, the first copy of each
            texts = texts[first]
            wanted = listed.read(lo, hi)
            at = index_in(keys, wanted["key"])
            row = wanted["row"][at]
            unlisted = at < 0
            row[unlisted] = rows + np.arange(unlisted.sum())
            rows += int(unlisted.sum())
            filled[row[~unlisted]] = True
            texts["row"] = row
            placed.add(texts["shard"], texts)
        if not filled.all():
            lacking = unpack(order[np.flatnonzero(~filled)[:1]]).to_pylist()[0]
            raise ModrmError(f"{self.folder}: text {tuple(lacking.values())} is to be committed but no shard has it")
        return placed, rows

    def compact(self) -> int:
        """Merge the committed segments into one (many small runs leave many; each is a file to open and map).
        Copies every row once, block by block, then commits the new segment as a run commits its own: a kill
        leaves the old layout or the new one, and the next writer removes what no commit lists. Readers that
        opened the old segments keep reading them until they close. Returns how many segments were merged."""
        if self.lock is None:
            raise RuntimeError("compact needs the writer's lock (Cache.open)")
        old = self.segments
        if len(old) < 2:
            return 0
        stem = self.folder / "segments" / f"seg-{int(old[-1].h5.stem.removeprefix('seg-')) + 1:06d}"
        rows = self.embeddings(memory_budget_bytes=0)

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as out:
                ds = out.create_dataset("embeddings", shape=(self.n_rows, self.fingerprint.dim), dtype=np.float16)
                for lo in range(0, self.n_rows, COPY_ROWS):
                    block = rows[lo : lo + COPY_ROWS]
                    for array in getattr(rows, "maps", []):
                        _release_pages(array)
                    ds[lo : lo + len(block)] = block

        atomic_write(stem.with_suffix(".h5"), write)
        self._write_commit([self._write_merged_index(stem)])
        self.reload()
        self._publish_texts_view()
        for segment in old:
            for path in (segment.h5, segment.texts, *segment.sorted_keys):
                path.unlink(missing_ok=True)
        return len(old)

    def _segmented(self) -> bool:
        return bool(self.segments) and self.segments[0].texts is not None

    def _adopt_old_file(self) -> list[Listed]:
        """The committed segments as listed; an old-style cache's file becomes segment 0 by a hard link."""
        if self._segmented():
            return [(s.h5.stem, s.rows, s.texts_bytes) for s in self.segments]
        if not self.segments:
            return []
        stem = self.folder / "segments" / "seg-000000"
        stem.parent.mkdir(exist_ok=True)
        try:
            os.link(self.segments[0].h5, stem.with_suffix(".h5"))
        except OSError:  # a filesystem without hard links: one copy, once
            shutil.copyfile(self.segments[0].h5, stem.with_suffix(".h5"))
        return [self._write_merged_index(stem)]

    def _write_merged_index(self, stem: Path) -> Listed:
        """Every committed row's texts index and sorted keys as one segment's (compact, an old cache's first
        commit): two passes over the segments' indexes, a row group at a time."""

        def entries() -> Iterator[np.ndarray]:
            for segment in self.segments:
                for block in self._read_index(segment):
                    block["row"] += segment.start
                    yield block

        _write_index(stem.with_suffix(".parquet"), entries(), 0)
        _write_sorted_keys(stem, self.n_rows, entries())
        return stem.name, self.n_rows, stem.with_suffix(".parquet").stat().st_size

    def _write_segment(
        self, number: int, shards: list[tuple[Path, Path]], placed: Spill, rows: int, work: Path
    ) -> Listed:
        """segments/seg-N.h5, .parquet and sorted keys: each shard's texts scattered to their rows, a shard at a
        time (its pages dropped after), the texts index through a spill by row group."""
        stem = self.folder / "segments" / f"seg-{number:06d}"
        stem.parent.mkdir(exist_ok=True)
        dim = self.fingerprint.dim
        index = Spill(work / "index", SHARD_TEXT, rows // INDEX_ROWS + 1)

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as out:
                ds = out.create_dataset("embeddings", shape=(rows, dim), dtype=np.float16)
                ds[rows - 1] = 0  # allocates the contiguous storage, so it can be memory-mapped
                offset = ds.id.get_offset()
            segment = np.memmap(tmp, dtype=np.float16, mode="r+", offset=offset, shape=(rows, dim))
            for shard_number, (index_path, npy) in enumerate(shards):
                where = placed.read(shard_number)
                if not len(where):
                    continue
                shard = _load_npy(npy, index_path, dim)
                block = shard[where["index"]]
                _release_pages(shard)
                if not np.isfinite(block).all():
                    raise ModrmError(f"{self.folder}: refusing to write non-finite embeddings to the cache")
                segment[where["row"]] = block
                segment.flush()
                _release_pages(segment)  # written back: the segment's pages stay in the page cache, not here
                index.add(where["row"] // INDEX_ROWS, where)
            del segment

        atomic_write(stem.with_suffix(".h5"), write)
        by_row = (np.sort(index.read(part), order="row") for part in range(index.parts))
        _write_index(stem.with_suffix(".parquet"), by_row, self.n_rows)
        _write_sorted_keys(stem, rows, (placed.read(part) for part in range(placed.parts)))
        return stem.name, rows, stem.with_suffix(".parquet").stat().st_size

    def _write_commit(self, segments: list[Listed], pending_id: str | None = None) -> None:
        """Replace embeddings.h5 by a virtual dataset over `segments`: the commit point. It names the pending/
        folder it took in, so a kill before that folder is removed cannot commit its texts twice."""
        total, dim = sum(rows for _, rows, _ in segments), self.fingerprint.dim
        layout = h5py.VirtualLayout(shape=(total, dim), dtype=np.float16)
        start = 0
        for name, rows, _ in segments:
            layout[start : start + rows] = h5py.VirtualSource(f"segments/{name}.h5", "embeddings", shape=(rows, dim))
            start += rows

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f.create_virtual_dataset("embeddings", layout)
                f.attrs[SEGMENTS_KEY] = json.dumps(segments)
                f.attrs[COMMITTED_PENDING_KEY] = pending_id or ""
                f.attrs[FINGERPRINT_KEY] = json.dumps(self.fingerprint.to_dict())

        atomic_write(self.folder / "embeddings.h5", write)

    def _publish_texts_view(self) -> None:
        """texts.parquet/ holds exactly the committed segments' parquet files (hard links), so pandas and pyarrow
        read the whole index as one table. A view only: modrm itself reads the segments that embeddings.h5 lists."""
        view = self.folder / "texts.parquet"
        if view.is_file():  # an old cache's index, now segment 0's
            view.unlink()
        view.mkdir(exist_ok=True)
        wanted = {s.texts.name: s.texts for s in self.segments if s.texts is not None}
        for part in view.iterdir():
            if part.name not in wanted:
                part.unlink()
        for name, target in wanted.items():
            if not (view / name).exists():
                try:
                    os.link(target, view / name)
                except OSError:
                    shutil.copyfile(target, view / name)

    # -------------------------------------------------------------------------------------- reading

    def keys(self) -> list[Key]:
        """Every committed (role, text_hash), in row order (as Python objects: for inspection and tests)."""
        blocks = (block["key"] for segment in self.segments for block in self._read_index(segment))
        spelled = unpack(np.concatenate([np.empty(0, KEY), *blocks]))
        return list(zip(spelled.column("role").to_pylist(), spelled.column("text_hash").to_pylist(), strict=True))

    def find(self, keys: Sequence[Key] | pa.Table | np.ndarray) -> np.ndarray:
        """KEY_ROW of each key: its row (-1 where the cache lacks it) and whether it was truncated. A binary search
        of each segment's sorted keys, in place: the pages read grow with the keys asked and the log of the rows."""
        asked = as_keys(keys)
        unique, inverse = np.unique(asked, return_inverse=True)  # sorted: the searches walk each file forwards
        found = np.zeros(len(unique), dtype=KEY_ROW)
        found["row"] = -1
        for segment in (s for s in self.segments if s.rows):
            sorted_keys, key_rows = self._sorted_keys(segment)
            at = np.minimum(np.searchsorted(sorted_keys, unique), segment.rows - 1)
            hit = np.flatnonzero((sorted_keys[at] == unique) & (found["row"] < 0))
            where = key_rows[at[hit]]
            found["row"][hit] = segment.start + where["row"]
            found["truncated"][hit] = where["truncated"]
        return found[inverse.reshape(-1)]

    def _sorted_keys(self, segment: Segment) -> tuple[np.ndarray, np.ndarray]:
        """A segment's keys sorted and their KEY_ROW: its files, mapped; for a segment without them (an old-style
        cache, or a segment of an older modrm opened by a reader) sorted in memory from its texts index."""
        if segment.h5 not in self._sorted:
            entries = np.concatenate([np.empty(0, INDEX_ENTRY), *self._read_index(segment)])
            entries = entries[np.argsort(entries["key"])]
            self._sorted[segment.h5] = entries["key"].copy(), records(KEY_ROW, **_fields(entries, KEY_ROW))
        return self._sorted[segment.h5]

    def text_columns(self, rows: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """`columns` of the texts index at `rows`, reading only the row groups that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out = {c: np.empty(len(rows), dtype=TEXT_SCHEMA.field(c).type.to_pandas_dtype()) for c in columns}
        starts = np.array([segment.start for segment in self.segments], dtype=np.int64)
        of_segment = np.searchsorted(starts, rows, side="right") - 1
        try:
            for s in np.unique(of_segment):
                segment, mine = self.segments[s], np.flatnonzero(of_segment == s)
                local = rows[mine] - segment.start
                with pq.ParquetFile(segment.texts or self.folder / "texts.parquet") as index:
                    sizes = [index.metadata.row_group(g).num_rows for g in range(index.num_row_groups)]
                    bounds = np.cumsum([0, *sizes])
                    group = np.searchsorted(bounds, local, side="right") - 1
                    for g in np.unique(group):
                        table, at = index.read_row_group(int(g), columns=list(columns)), group == g
                        for c in columns:
                            out[c][mine[at]] = table.column(c).to_numpy()[local[at] - bounds[g]]
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            raise damaged(self.folder, f"the texts index is unreadable ({err})") from None
        return out

    def rows(self, keys: Sequence[Key] | pa.Table | np.ndarray) -> np.ndarray:
        asked = as_keys(keys)
        rows = self.find(asked)["row"]
        if (rows < 0).any():
            lacking = tuple(unpack(asked[rows < 0][:1]).to_pylist()[0].values())
            raise ModrmError(f"{self.folder}: text {lacking} is not in the cache; run `modrm embed`")
        return rows

    def embeddings(self, memory_budget_bytes: float = float("inf")) -> np.ndarray | MappedRows:
        """float16 [n_rows, dim]: read into memory, or memory-mapped (segment by segment) when larger than the
        budget."""
        if not self.segments:
            raise ModrmError(f"{self.folder}: no embeddings.h5; run `modrm embed` first")
        dim = self.fingerprint.dim
        maps, offsets = [], []
        for segment in self.segments:
            with h5py.File(segment.h5, "r") as f:
                offsets.append(f["embeddings"].id.get_offset())
        if self.n_rows * dim * 2 <= memory_budget_bytes or None in offsets:
            out = np.empty((self.n_rows, dim), dtype=np.float16)
            for segment in self.segments:
                with h5py.File(segment.h5, "r") as f:
                    out[segment.start : segment.start + segment.rows] = f["embeddings"][: segment.rows]
            return out
        for segment, offset in zip(self.segments, offsets, strict=True):
            maps.append(np.memmap(segment.h5, dtype=np.float16, mode="r", offset=offset, shape=(segment.rows, dim)))
        return MappedRows(maps)

    def write_pairs(self, table: pa.Table) -> None:
        atomic_write(self.folder / "pairs.parquet", lambda tmp: pq.write_table(table, tmp))

    def read_pairs(self, columns: Sequence[str] | None = None) -> pa.Table:
        """pairs.parquet, checked (every column there, every row index inside embeddings.h5); `columns`: read only
        those and the row columns, the few-valued ones as dictionaries (stage 0 at 10M pairs needs neither the pair
        ids nor the tasks, nor a string per pair for its module and split)."""
        path = self.folder / "pairs.parquet"
        if not path.exists():
            raise ModrmError(f"{self.folder}: no pairs.parquet; run `modrm embed --data FILE --cache {self.folder}`")
        try:
            missing = {*ROW_COLUMNS, "pair_id", "target_module", "task", "split"} - set(pq.read_schema(path).names)
            if missing:
                raise KeyError(f"no column {', '.join(sorted(missing))}")
            wanted = None if columns is None else list(dict.fromkeys([*ROW_COLUMNS, *columns]))
            few_valued = [c for c in ("target_module", "split") if wanted is not None and c in wanted]
            table = pq.read_table(path, columns=wanted, read_dictionary=few_valued)
            bounds = [pc.min_max(table.column(c)).as_py() for c in ROW_COLUMNS]
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            raise damaged(self.folder, f"pairs.parquet is unreadable ({err})") from None
        nulls = any(table.column(c).null_count for c in ROW_COLUMNS)
        if len(table) and (nulls or any(b["min"] < 0 or b["max"] >= self.n_rows for b in bounds)):
            raise damaged(self.folder, "pairs.parquet points at rows embeddings.h5 does not have")
        return table


class MappedRows:
    """Memory-mapped segments indexed as one [n_rows, dim] array: `rows[idx]` gathers from each segment."""

    def __init__(self, maps: list[np.memmap]):
        self.maps = maps
        self.starts = np.cumsum([0] + [len(m) for m in maps])
        self.shape = (int(self.starts[-1]), maps[0].shape[1])
        self.dtype = maps[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray | slice) -> np.ndarray:
        rows = np.arange(*rows.indices(self.shape[0])) if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        segment = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        for s in np.unique(segment):
            mine = segment == s
            out[mine] = self.maps[s][rows[mine] - self.starts[s]]
        return out

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = np.concatenate(self.maps)
        return whole if dtype is None else whole.astype(dtype)


# ---------------------------------------------------------------------------------------------- helpers


Listed = tuple[str, int, int | None]  # a segment in embeddings.h5's list: its name, rows and texts index's bytes


def _listed(entry: list) -> Listed:
    """[name, rows, texts_bytes], or [name, rows] as an older modrm listed them."""
    name, rows, *size = entry
    return str(name), int(rows), int(size[0]) if size and size[0] is not None else None


def _segments(folder: Path, listed: list[Listed]) -> list[Segment]:
    """Segment objects for the listed ones, in row order."""
    segments, start = [], 0
    for name, rows, texts_bytes in listed:
        stem = folder / "segments" / name
        segments.append(Segment(stem.with_suffix(".h5"), stem.with_suffix(".parquet"), start, rows, texts_bytes))
        start += rows
    return segments


def _fields(entries: np.ndarray, dtype: np.dtype) -> dict[str, np.ndarray]:
    """`entries`' fields that `dtype` has, by name (numpy casts one record type to another by position)."""
    return {name: entries[name] for name in dtype.names}


def _old_texts_rows(folder: Path) -> int:
    try:
        return pq.read_metadata(folder / "texts.parquet").num_rows
    except (OSError, ValueError, pa.ArrowException) as err:
        raise damaged(folder, f"texts.parquet is unreadable ({err})") from None


def _write_index(path: Path, blocks: Iterable[np.ndarray], start: int) -> None:
    """A segment's texts index (TEXT_COLUMNS): from blocks of records (key, row in the segment, n_tokens,
    truncated) in row order, the keys spelled out a block at a time, a row group each; rows counted from `start`."""

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, TEXT_SCHEMA) as writer:
            for block in blocks:
                spelled = unpack(block["key"])
                columns = {
                    "text_hash": spelled.column("text_hash"),
                    "row": start + block["row"],
                    "role": spelled.column("role"),
                    "n_tokens": block["n_tokens"],
                    "truncated": block["truncated"],
                }
                writer.write_table(pa.table(columns, schema=TEXT_SCHEMA))

    atomic_write(path, write)


def _write_sorted_keys(stem: Path, rows: int, blocks: Iterable[np.ndarray]) -> None:
    """A segment's sorted keys, from blocks of its texts' records (key, row in the segment, truncated) in any
    order: through a spill by key bucket, so memory holds a few buckets. The keys file is written last (it makes
    the pair count), and both are whole or absent."""
    with tempfile.TemporaryDirectory(prefix="modrm-keys-") as work:
        spill = Spill(Path(work) / "keys", INDEX_ENTRY, BUCKETS)
        for block in blocks:
            spill.add(bucket(block["key"]), records(INDEX_ENTRY, **_fields(block, INDEX_ENTRY)))

        def write(keys_tmp: Path, rows_tmp: Path) -> None:
            with keys_tmp.open("wb") as keys_out, rows_tmp.open("wb") as rows_out:
                keys_out.write(_npy_header(KEY, rows))
                rows_out.write(_npy_header(KEY_ROW, rows))
                written = 0
                for lo, hi in spill.groups(INDEX_ROWS):
                    entries = spill.read(lo, hi)
                    entries = entries[np.argsort(entries["key"])]
                    np.ascontiguousarray(entries["key"]).tofile(keys_out)
                    records(KEY_ROW, **_fields(entries, KEY_ROW)).tofile(rows_out)
                    written += len(entries)
            if written != rows:
                raise RuntimeError(f"{stem.name}: {written} keys for {rows} rows")

        keys_path, rows_path = _sorted_paths(stem)
        atomic_write(keys_path, lambda keys_tmp: atomic_write(rows_path, lambda rows_tmp: write(keys_tmp, rows_tmp)))


def _sorted_paths(stem: Path) -> tuple[Path, Path]:
    """A segment's sorted keys (KEY) and, beside each, its KEY_ROW."""
    return stem.with_suffix(".keys.npy"), stem.with_suffix(".keyrows.npy")


def _npy_header(dtype: np.dtype, rows: int) -> bytes:
    """The .npy header of a vector of `rows` of `dtype` (so numpy.load reads a sorted keys file too)."""
    header = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows,)}
    np.lib.format.write_array_header_2_0(header, fields)
    return header.getvalue()


def _read_shard_index(path: Path, columns: Sequence[str] = ()) -> tuple[np.ndarray, pa.Table]:
    """A pending shard's keys, and its other `columns`."""
    try:
        table = pq.read_table(path, columns=["role", "text_hash", *columns])
        return pack(table.column("role"), table.column("text_hash")), table.select(list(columns))
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise ModrmError(
            f"{path}: an unfinished run's shard is damaged ({err}); remove {path.parent} (its texts are encoded again)"
        ) from None


def _release_pages(array: np.memmap) -> None:
    """Drop a read-only memory map's resident pages from this process (the kernel keeps them cached), so a commit
    that reads every shard once holds one block of them, not all."""
    array._mmap.madvise(mmap.MADV_DONTNEED)


def _load_npy(path: Path, index_path: Path, dim: int) -> np.memmap:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        rows = pq.read_metadata(index_path).num_rows
    except (OSError, ValueError, pa.ArrowException) as err:
        raise ModrmError(
            f"{path}: an unfinished run's shard is damaged ({err}); remove {path.parent} (its texts are encoded again)"
        ) from None
    if array.shape != (rows, dim):
        raise ModrmError(f"{index_path}: its embeddings do not match its index; remove {path.parent}")
    return array


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:  # a handle, as np.save would add ".npy" to the temporary name
        np.save(handle, array, allow_pickle=False)


def _pending_id(pending: Path) -> str | None:
    try:
        return str(json.loads((pending / "id.json").read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pending_differs(path: Path, fingerprint: Fingerprint) -> bool:
    try:
        return bool(Fingerprint(**json.loads(path.read_text())).differences(fingerprint))
    except (OSError, ValueError, TypeError):
        return True


def _committed_manifest(folder: Path) -> dict | None:
    """The fingerprint stored with the commit point, for a cache whose first run died before its manifest."""
    h5, old_texts = folder / "embeddings.h5", folder / "texts.parquet"
    try:
        if h5.exists():
            with h5py.File(h5, "r") as f:
                raw = f.attrs.get(FINGERPRINT_KEY)
            if raw is not None:
                return {"encoder": json.loads(raw)}
        if old_texts.is_file():  # an old cache kept it in the texts index
            raw = (pq.read_schema(old_texts).metadata or {}).get(FINGERPRINT_KEY.encode())
            return {"encoder": json.loads(raw)} if raw else None
    except (OSError, ValueError, pa.ArrowException) as err:
        raise damaged(folder, f"the committed index is unreadable ({err})") from None
    return None


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise damaged(Path(folder), f"manifest.json is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise damaged(Path(folder), "manifest.json is not a JSON object")
    return manifest


def manifest_fingerprint(folder: Path, manifest: dict) -> Fingerprint:
    try:
        return Fingerprint(**manifest["encoder"])
    except (KeyError, TypeError) as err:
        raise damaged(folder, f"manifest.json has no valid encoder fingerprint ({err!r})") from None


def check_fingerprint(folder: Path, manifest: dict, fingerprint: Fingerprint) -> None:
    built = manifest_fingerprint(folder, manifest)
    diffs = built.differences(fingerprint)
    if diffs:
        raise ModrmError(
            f"{folder}: cache was built with a different encoder setting ({'; '.join(diffs)}); "
            "use the same encoder settings or another --cache folder"
        )


def open_existing(folder: str | Path) -> tuple[Cache, dict]:
    """A cache for reading only (train-heads): its own manifest is the fingerprint."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise ModrmError(f"{folder}: not an embedding cache (no manifest.json); run `modrm embed` first")
    return Cache.read(folder, manifest_fingerprint(Path(folder), manifest)), manifest
