"""A text's key in the cache: its role and the SHA-256 of its text, packed in 33 bytes (a role byte, the digest).

The cache's parquet files spell a key as two strings (role, 64 hex digits) for pandas and people; in memory
modrm holds keys packed, one numpy array of KEY: a million take 33 MB (as Python tuples of hex strings, about
180 MB), sort in the order of (role, hex digest), and reach arrow's hash kernels without a copy.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROLE_NAMES = ("context", "module")  # a key's first byte is its role's place here
KEY = np.dtype("V33")
_FIELDS = np.dtype([("role", "u1"), ("digest", "V32")])  # the same 33 bytes, by field
ROLE_BYTES = {role: bytes([code]) for code, role in enumerate(ROLE_NAMES)}

Key = tuple[str, str]  # (role, text_hash): a key as the parquet files and people spell it


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_key(role: str, text: str) -> bytes:
    """The packed key of one text (the hot loop's: no hex, no tuple)."""
    return ROLE_BYTES[role] + hashlib.sha256(text.encode("utf-8")).digest()


def pack(roles: pa.Array | pa.ChunkedArray, hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """KEY array from role and text_hash string columns; ValueError names what is not a key."""
    codes = _one_chunk(pc.index_in(roles, value_set=pa.array(ROLE_NAMES)))
    if codes.null_count:
        raise ValueError(f"a role is not one of {', '.join(ROLE_NAMES)}")
    try:
        fixed = _one_chunk(hashes.cast(pa.binary(64)))
        digests = binascii.unhexlify(
            memoryview(fixed.buffers()[1])[fixed.offset * 64 : (fixed.offset + len(fixed)) * 64]
        )
    except (pa.ArrowInvalid, binascii.Error):
        raise ValueError("a text_hash is not 64 hex digits") from None
    out = np.empty(len(fixed), dtype=_FIELDS)
    out["role"], out["digest"] = codes.to_numpy(), np.frombuffer(digests, dtype="V32")
    return out.view(KEY)


def unpack(keys: np.ndarray) -> pa.Table:
    """The role and text_hash string columns of KEY array `keys`."""
    fields = keys.view(_FIELDS)
    digits = binascii.hexlify(np.ascontiguousarray(fields["digest"]))
    hashes = pa.FixedSizeBinaryArray.from_buffers(pa.binary(64), len(keys), [None, pa.py_buffer(digits)])
    return pa.table({"role": pc.take(pa.array(ROLE_NAMES), fields["role"]), "text_hash": hashes.cast(pa.string())})


def _one_chunk(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if not isinstance(values, pa.ChunkedArray):
        return values
    return values.chunk(0) if values.num_chunks == 1 else pa.concat_arrays(values.chunks or [pa.array([], values.type)])


def as_keys(keys: Sequence[Key] | pa.Table | np.ndarray) -> np.ndarray:
    """KEY array from packed keys, a table with role and text_hash columns, or (role, text_hash) tuples."""
    if isinstance(keys, np.ndarray) and keys.dtype == KEY:
        return keys
    if isinstance(keys, pa.Table):
        return pack(keys.column("role"), keys.column("text_hash"))
    keys = list(keys)
    return pack(pa.array([k[0] for k in keys], pa.string()), pa.array([k[1] for k in keys], pa.string()))


def roles_of(keys: np.ndarray) -> np.ndarray:
    """Each key's role, as its place in ROLE_NAMES."""
    return keys.view(_FIELDS)["role"]


def as_arrow(keys: np.ndarray) -> pa.FixedSizeBinaryArray:
    """The same bytes as an arrow array, for its hash kernels (no copy)."""
    keys = np.ascontiguousarray(keys)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(33), len(keys), [None, pa.py_buffer(keys)])


BUCKETS = len(ROLE_NAMES) * 256  # a key's bucket: its role and its digest's first byte, so buckets go in key order


def bucket(keys: np.ndarray) -> np.ndarray:
    """Each key's bucket (int64): one text's appearances all meet in one, and they are about equal in size."""
    first_bytes = np.ascontiguousarray(keys).view(np.uint8).reshape(-1, KEY.itemsize)[:, :2].astype(np.int64)
    return first_bytes[:, 0] * 256 + first_bytes[:, 1]


def index_in(keys: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Where each key first is in `among`, -1 where it is not: one hash table of `among`, in arrow."""
    where = pc.index_in(as_arrow(keys), value_set=as_arrow(among))
    return where.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
