"""The embedding cache: one folder per encoder fingerprint.

    embeddings.h5    dataset `embeddings`, float16 [n_texts, dim], contiguous (so it can be memory-mapped)
    texts.parquet    text_hash, row, role, n_tokens, truncated   (the commit point: rows it lists are valid)
    pairs.parquet    pair_id, target_module, task, split, pos/neg ctx/mod rows, pos/neg outcome
    manifest.json    the encoder fingerprint, dtype, counts, versions
    pending/         shards of an unfinished run: kept across a kill, merged by the next run

Crash safety: new embeddings go to pending shards (each written atomically), then one merge writes a new
embeddings.h5 and texts.parquet by rename. A run killed at any moment leaves the old cache intact, and
the next run merges whatever shards were finished instead of encoding them again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write, write_json
from pipeline.encoder import Fingerprint
from pipeline.errors import ModrmError

TEXT_COLUMNS = ("text_hash", "row", "role", "n_tokens", "truncated")
ROW_COLUMNS = ("pos_ctx_row", "pos_mod_row", "neg_ctx_row", "neg_mod_row")
_COPY_ROWS = 1 << 16
_FINGERPRINT_KEY = "modrm_fingerprint"

Key = tuple[str, str]  # (role, text_hash)


@dataclass
class Shard:
    """Embeddings of some texts, encoded but not yet merged into the cache."""

    keys: list[Key]
    n_tokens: np.ndarray
    truncated: np.ndarray
    embeddings: np.ndarray  # float16


def damaged(folder: Path, what: str) -> ModrmError:
    """A cache file that a kill cannot produce (every write is atomic): damaged from outside, so not trusted."""
    return ModrmError(
        f"{folder}: {what}; this cache cannot be trusted: remove it (rm -r {folder}) and run `modrm embed` again"
    )


class Cache:
    def __init__(self, folder: str | Path, fingerprint: Fingerprint):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.texts = self._read_texts()
        self.index: dict[Key, int] = dict(
            zip(zip(self.texts["role"], self.texts["text_hash"], strict=True), self.texts["row"], strict=True)
        )
        if self.n_rows:
            self._check_embeddings()

    # -------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, folder: str | Path, fingerprint: Fingerprint) -> Cache:
        """Open (or start) a cache; refuse one built by a different encoder, naming what differs."""
        folder = Path(folder)
        for stale in folder.glob(".*.tmp-*"):  # a write a kill interrupted; the file it was replacing is intact
            stale.unlink()
        manifest = read_manifest(folder) or _texts_manifest(folder)
        if manifest is not None:
            check_fingerprint(folder, manifest, fingerprint)
        pending_fp = folder / "pending" / "fingerprint.json"
        if pending_fp.exists() and _pending_differs(pending_fp, fingerprint):
            shutil.rmtree(folder / "pending")  # shards of another encoder (or unreadable) can never be merged here
        return cls(folder, fingerprint)

    @property
    def n_rows(self) -> int:
        return len(self.texts["row"])

    def _read_texts(self) -> dict[str, np.ndarray]:
        path = self.folder / "texts.parquet"
        if not path.exists():
            return {
                "text_hash": np.array([], dtype=object),
                "row": np.array([], dtype=np.int64),
                "role": np.array([], dtype=object),
                "n_tokens": np.array([], dtype=np.int64),
                "truncated": np.array([], dtype=bool),
            }
        try:
            table = pq.read_table(path)
            texts = {name: table.column(name).to_numpy(zero_copy_only=False) for name in TEXT_COLUMNS}
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            raise damaged(self.folder, f"texts.parquet is unreadable ({err})") from None
        if not np.array_equal(texts["row"], np.arange(len(texts["row"]))):
            raise damaged(self.folder, "texts.parquet's rows are not 0, 1, 2, ...")
        return texts

    def _check_embeddings(self) -> None:
        """embeddings.h5 holds every row texts.parquet lists, at the fingerprint's dimension, all of its bytes."""
        path = self.folder / "embeddings.h5"
        if not path.is_file():
            raise damaged(self.folder, f"embeddings.h5 is missing, but texts.parquet lists {self.n_rows} rows")
        try:
            with h5py.File(path, "r") as f:
                ds = f["embeddings"]
                shape, offset = ds.shape, ds.id.get_offset()
        except (OSError, KeyError, ValueError) as err:
            raise damaged(self.folder, f"embeddings.h5 is unreadable ({err})") from None
        if len(shape) != 2 or shape[0] < self.n_rows or shape[1] != self.fingerprint.dim:
            raise damaged(
                self.folder,
                f"embeddings.h5 holds {shape}, but texts.parquet lists {self.n_rows} rows of dim "
                f"{self.fingerprint.dim}",
            )
        if offset is not None and path.stat().st_size < offset + shape[0] * shape[1] * 2:
            raise damaged(self.folder, f"embeddings.h5 is truncated ({path.stat().st_size:,} bytes)")

    # -------------------------------------------------------------------------------------- pending

    def pending_shards(self) -> list[Shard]:
        """Shards a killed run finished; a shard counts once its index file exists (written last)."""
        shards = []
        for index_path in sorted((self.folder / "pending").glob("shard-*.parquet")):
            try:
                table = pq.read_table(index_path)
                embeddings = np.load(index_path.with_suffix(".npy"), allow_pickle=False)
                roles, hashes = table.column("role").to_pylist(), table.column("text_hash").to_pylist()
                n_tokens, truncated = table.column("n_tokens").to_numpy(), table.column("truncated").to_numpy()
            except (OSError, ValueError, KeyError, pa.ArrowException) as err:
                raise ModrmError(
                    f"{index_path}: an unfinished run's shard is damaged ({err}); remove {index_path.parent} "
                    "(its texts are encoded again)"
                ) from None
            if embeddings.shape != (len(roles), self.fingerprint.dim):
                raise ModrmError(f"{index_path}: its embeddings do not match its index; remove {index_path.parent}")
            shards.append(Shard(list(zip(roles, hashes, strict=True)), n_tokens, truncated, embeddings))
        return shards

    def add_shard(self, shard: Shard) -> None:
        pending = self.folder / "pending"
        if not (pending / "fingerprint.json").exists():  # not `pending.exists()`: a kill may follow the mkdir
            pending.mkdir(parents=True, exist_ok=True)
            write_json(pending / "fingerprint.json", self.fingerprint.to_dict())
        number = len(list(pending.glob("shard-*.parquet")))
        stem = pending / f"shard-{number:06d}"
        atomic_write(stem.with_suffix(".npy"), lambda tmp: _save_npy(tmp, shard.embeddings))
        roles, hashes = zip(*shard.keys, strict=True)
        table = pa.table(
            {"text_hash": list(hashes), "role": list(roles), "n_tokens": shard.n_tokens, "truncated": shard.truncated}
        )
        atomic_write(stem.with_suffix(".parquet"), lambda tmp: pq.write_table(table, tmp))

    # -------------------------------------------------------------------------------------- merge

    def merge(self, order: list[Key], shards: list[Shard]) -> int:
        """Append the shards' texts as new rows, in `order` (first appearance), so any interrupted run
        followed by a resume gives the same rows as one uninterrupted run. Returns rows added."""
        found: dict[Key, tuple[int, int]] = {}
        for s, shard in enumerate(shards):
            for i, key in enumerate(shard.keys):
                if key not in self.index:
                    found.setdefault(key, (s, i))
        new_keys = [k for k in order if k in found] + sorted(set(found) - set(order))
        if not new_keys:
            shutil.rmtree(self.folder / "pending", ignore_errors=True)
            return 0
        source = np.array([found[k] for k in new_keys])
        dim = shards[0].embeddings.shape[1]
        new_emb = np.empty((len(new_keys), dim), dtype=np.float16)
        n_tokens = np.empty(len(new_keys), dtype=np.int64)
        truncated = np.empty(len(new_keys), dtype=bool)
        for s, shard in enumerate(shards):
            mine = source[:, 0] == s
            new_emb[mine] = shard.embeddings[source[mine, 1]]
            n_tokens[mine] = shard.n_tokens[source[mine, 1]]
            truncated[mine] = shard.truncated[source[mine, 1]]
        if not np.isfinite(new_emb).all():
            raise ModrmError(f"{self.folder}: refusing to write non-finite embeddings to the cache")
        self._write_embeddings(new_emb)
        start = self.n_rows
        roles, hashes = zip(*new_keys, strict=True)
        texts = {
            "text_hash": np.concatenate([self.texts["text_hash"], np.array(hashes, dtype=object)]),
            "row": np.concatenate([self.texts["row"], np.arange(start, start + len(new_keys))]),
            "role": np.concatenate([self.texts["role"], np.array(roles, dtype=object)]),
            "n_tokens": np.concatenate([self.texts["n_tokens"], n_tokens]),
            "truncated": np.concatenate([self.texts["truncated"], truncated]),
        }
        # the fingerprint rides in the commit point too: a kill before manifest.json is written must not
        # leave rows that a later run with another encoder would take as its own
        table = pa.table(texts).replace_schema_metadata({_FINGERPRINT_KEY: json.dumps(self.fingerprint.to_dict())})
        atomic_write(self.folder / "texts.parquet", lambda tmp: pq.write_table(table, tmp))
        self.texts = texts
        self.index.update((key, start + i) for i, key in enumerate(new_keys))
        manifest = read_manifest(self.folder) or {}  # eval adds texts too: keep the counts true
        write_json(
            self.folder / "manifest.json", manifest | {"encoder": self.fingerprint.to_dict(), "n_texts": self.n_rows}
        )
        shutil.rmtree(self.folder / "pending", ignore_errors=True)
        return len(new_keys)

    def _write_embeddings(self, new_emb: np.ndarray) -> None:
        """A new file with the committed rows copied and the new ones after, renamed into place."""
        old_path = self.folder / "embeddings.h5"
        committed = self.n_rows

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as out:
                ds = out.create_dataset(
                    "embeddings", shape=(committed + len(new_emb), new_emb.shape[1]), dtype=np.float16
                )
                if committed:
                    with h5py.File(old_path, "r") as old:
                        for lo in range(0, committed, _COPY_ROWS):
                            hi = min(lo + _COPY_ROWS, committed)
                            ds[lo:hi] = old["embeddings"][lo:hi]
                ds[committed:] = new_emb

        atomic_write(old_path, write)

    # -------------------------------------------------------------------------------------- reading

    def rows(self, keys: list[Key]) -> np.ndarray:
        try:
            return np.fromiter((self.index[k] for k in keys), dtype=np.int64, count=len(keys))
        except KeyError as err:
            raise ModrmError(f"{self.folder}: text {err.args[0]} is not in the cache; run `modrm embed`") from None

    def embeddings(self, memory_budget_bytes: float = float("inf")) -> np.ndarray:
        """float16 [n_rows, dim]: read into memory, or memory-mapped when larger than the budget."""
        path = self.folder / "embeddings.h5"
        if not path.exists():
            raise ModrmError(f"{self.folder}: no embeddings.h5; run `modrm embed` first")
        with h5py.File(path, "r") as f:
            ds = f["embeddings"]
            offset = ds.id.get_offset()
            shape = (self.n_rows, ds.shape[1])
            if shape[0] * shape[1] * 2 <= memory_budget_bytes or offset is None:
                return ds[: shape[0]]
        return np.memmap(path, dtype=np.float16, mode="r", offset=offset, shape=shape)

    def write_pairs(self, table: pa.Table) -> None:
        atomic_write(self.folder / "pairs.parquet", lambda tmp: pq.write_table(table, tmp))

    def read_pairs(self) -> pa.Table:
        path = self.folder / "pairs.parquet"
        if not path.exists():
            raise ModrmError(f"{self.folder}: no pairs.parquet; run `modrm embed --data FILE --cache {self.folder}`")
        try:
            table = pq.read_table(path)
            rows = np.stack([table.column(c).to_numpy() for c in ROW_COLUMNS]) if len(table) else np.zeros((4, 0))
            for column in ("pair_id", "target_module", "task", "split"):
                table.column(column)
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            raise damaged(self.folder, f"pairs.parquet is unreadable ({err})") from None
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise damaged(self.folder, "pairs.parquet points at rows embeddings.h5 does not have")
        return table


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:  # a handle, as np.save would add ".npy" to the temporary name
        np.save(handle, array, allow_pickle=False)


def _pending_differs(path: Path, fingerprint: Fingerprint) -> bool:
    try:
        return bool(Fingerprint(**json.loads(path.read_text())).differences(fingerprint))
    except (OSError, ValueError, TypeError):
        return True


def _texts_manifest(folder: Path) -> dict | None:
    """The fingerprint stored with texts.parquet, for a cache whose first run died before its manifest."""
    path = folder / "texts.parquet"
    try:
        metadata = (pq.read_schema(path).metadata or {}) if path.exists() else {}
        raw = metadata.get(_FINGERPRINT_KEY.encode())
        return {"encoder": json.loads(raw)} if raw else None
    except (OSError, ValueError, pa.ArrowException) as err:
        raise damaged(folder, f"texts.parquet is unreadable ({err})") from None


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
    return Cache(folder, manifest_fingerprint(Path(folder), manifest)), manifest
