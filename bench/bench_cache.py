"""The cache at scale, with synthetic float16 vectors of dim 1024 (Qwen3-Embedding-0.6B's size), no encoder:

1. Peak memory of embed's write path: N texts arrive as shards of SHARD_TEXTS (as `modrm embed` writes them) and
   one commit gathers them into a segment. Each size runs in a fresh process; its peak RSS (ru_maxrss) is compared
   with the size of the embeddings themselves, which the write path must never hold all at once.
2. Adding 1,000 texts to caches of M rows, as `modrm embed` does: open (lock, read and check every segment's keys),
   look the texts up, write the shard, commit. The write (shard and commit) may not depend on M; the open reads
   33 bytes a row.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from common import in_fresh_process, table, warn_if_busy, write_results

from pipeline.cache import Cache, Shard, as_keys, text_key
from pipeline.embed import SHARD_TEXTS
from pipeline.encoder import Fingerprint

DIM = 1024
FINGERPRINT = Fingerprint("synthetic", None, "0" * 64, "mean", True, "", 512, 512, DIM)


def keys(start: int, n: int) -> pa.Array:
    """The keys of texts start .. start + n: SHA-256 digests, as embed's are."""
    return as_keys(b"".join(text_key("module", str(i)) for i in range(start, start + n)))


def shard(start: int, n: int, rng: np.random.Generator | None) -> Shard:
    """Texts start..start+n with random vectors (or, without `rng`, one constant vector: building a big base
    cache is then disk-bound, not spent drawing random numbers)."""
    if rng is None:
        embeddings = np.broadcast_to(np.full(DIM, 0.5, dtype=np.float16), (n, DIM))
    else:
        embeddings = rng.standard_normal((n, DIM), np.float32).astype(np.float16)
    return Shard(keys(start, n), np.full(n, 64), np.zeros(n, dtype=bool), embeddings)


def grow(
    folder: Path, start: int, n: int, shard_texts: int = SHARD_TEXTS, random: bool = True, look_up: bool = False
) -> dict:
    """Add texts start..start+n as shards then one commit; seconds of the open and lookup, the shards and the
    commit."""
    rng = np.random.default_rng(start) if random else None
    t0 = time.perf_counter()
    with Cache.open(folder, FINGERPRINT) as cache:
        if look_up:  # as embed looks up the texts of its pairs
            assert (cache.find(keys(start, n)) < 0).all()
        t1 = time.perf_counter()
        for lo in range(start, start + n, shard_texts):
            cache.add_shard(shard(lo, min(shard_texts, start + n - lo), rng))
        t2 = time.perf_counter()
        cache.commit(keys(start, n))  # the new texts in order, as embed's plan hands them over
        t3 = time.perf_counter()
    return {"open_find_s": t1 - t0, "shards_s": t2 - t1, "commit_s": t3 - t2, "rows": start + n}


def child_peak_rss(n_texts: int, folder: Path) -> dict:
    """`grow` in a fresh interpreter, so its peak RSS is its own."""
    return in_fresh_process(
        "import sys; sys.path.insert(0, 'bench')\n"
        "from pathlib import Path\n"
        "from bench_cache import grow\n"
        f"r = grow(Path({str(folder)!r}), 0, {n_texts})\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--base-rows", type=int, nargs="+", default=[10_000, 1_000_000], help="10M: 20 GB of disk")
    parser.add_argument("--add", type=int, default=1_000)
    parser.add_argument("--workdir", type=Path, default=None, help="where the caches go (needs 2 bytes x 1024 x rows)")
    args = parser.parse_args()
    started = time.perf_counter()
    busy = warn_if_busy()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss, adds = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.rss_sizes:
            r = child_peak_rss(n, Path(tmp) / f"rss-{n}")
            rss.append({"texts": n, "embeddings_mib": n * DIM * 2 / 2**20, **r})
            print(f"embed write path, {n:,} texts: peak RSS {r['peak_rss_mib']:,.0f} MiB", flush=True)
        for m in args.base_rows:
            folder = Path(tmp) / f"base-{m}"
            for lo in range(0, m, 1_000_000):  # built in commits of 1M rows (shards of 64k) to bound temp space
                grow(folder, lo, min(1_000_000, m - lo), shard_texts=1 << 16, random=False)
            r = grow(folder, m, args.add, look_up=True)
            adds.append({"base_rows": m, "added": args.add, **r})
            print(
                f"add {args.add:,} to {m:,} rows: open and find {r['open_find_s']:.3f}s, "
                f"write {r['shards_s'] + r['commit_s']:.3f}s"
            )
    print()
    print(
        table(
            ["texts", "embeddings (MiB)", "peak RSS (MiB)"],
            [(r["texts"], r["embeddings_mib"], r["peak_rss_mib"]) for r in rss],
        )
    )
    print(f"(a bare interpreter with numpy, h5py and pyarrow: about {baseline:,.0f} MiB)\n")
    print(
        table(
            ["cache rows", "open + find (s)", "shard (s)", "commit (s)", "write in all (s)"],
            [
                (a["base_rows"], a["open_find_s"], a["shards_s"], a["commit_s"], a["shards_s"] + a["commit_s"])
                for a in adds
            ],
        )
    )
    write_results("bench_cache", {"dim": DIM, "embed_write_path": rss, "add_texts": adds}, started, busy)


if __name__ == "__main__":
    main()
