"""Stage-0 training throughput (pairs/s) from the embedding cache, against a plain-matmul ceiling.

Stage 0 never touches the encoder: each step gathers cached embeddings, runs one MLP head per module
present and steps AdamW. This measures `train_heads` end to end (cache read, gather, heads, loss, clip,
AdamW) on synthetic caches of dim 1024 (Qwen3-Embedding-0.6B's size) with 1k, 10k and 100k pairs, written
directly (one Shard of random float16 vectors, 4 rows per pair, 5% of the pairs in the val split). The rate
is the median over epochs of `pairs_per_s` from `metrics.jsonl` (training loop only, validation excluded);
100k pairs run one epoch, the others a few.

The ceiling is what the same matrix work costs with nothing else: forward + backward + AdamW through bare
Linear layers of the heads' shapes, [2B, 3072] -> 2048 -> 1024 -> 1 for B pairs per batch (B = the default
batch size), no gather, GELU, LayerNorm, dropout or clipping. It is timed twice: as one chain, and as four
chains (one per module, each on a quarter of the rows: the same FLOPs as one chain, and as many parameters
for AdamW to update as the real model), and the four chains once more with AdamW(fused=True), which
train_heads does not use, to show what the optimizer step costs. The goal is `train_heads` within 2x of
the ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from common import table, timed, use_all_cores, warn_if_busy, write_results
from torch import nn

from pipeline.cache import Cache, Shard, pack
from pipeline.config import Config, HeadConfig, TrainConfig
from pipeline.data import DEFAULT_MODULES
from pipeline.encoder import Fingerprint
from pipeline.train_heads import train_heads

DIM = 1024
SIZES = ((1_000, 5), (10_000, 3), (100_000, 1))  # (pairs, epochs)


def make_cache(folder: Path, n_pairs: int, dim: int, seed: int = 0, max_rows: int | None = None) -> Path:
    """A cache with 4 fresh rows per pair (pos ctx, pos mod, neg ctx, neg mod), modules round-robin; with
    `max_rows`, pairs draw their 4 rows at random from that many (the speed of a step does not depend on it)."""
    rng = np.random.default_rng(seed)
    n_rows = 4 * n_pairs if max_rows is None else min(4 * n_pairs, max_rows)
    fingerprint = Fingerprint("synthetic", None, "0" * 64, "mean", True, "", 512, 512, dim)
    with Cache.open(folder, fingerprint) as cache:
        keys = pack([("context", "module")[i % 2] for i in range(n_rows)], [f"{i:064x}" for i in range(n_rows)])
        embeddings = rng.standard_normal((n_rows, dim), dtype=np.float32).astype(np.float16)
        cache.add_shard(Shard(keys, np.full(n_rows, 64), np.zeros(n_rows, dtype=bool), embeddings))
        cache.commit(keys)
        fresh = n_rows == 4 * n_pairs
        rows = np.arange(n_rows).reshape(n_pairs, 4) if fresh else rng.integers(0, n_rows, (n_pairs, 4))
        pairs = pa.table(
            {
                "pair_id": [f"p{i}" for i in range(n_pairs)],
                "target_module": [DEFAULT_MODULES[i % len(DEFAULT_MODULES)] for i in range(n_pairs)],
                "task": [f"task {i // 4}" for i in range(n_pairs)],
                "group": [f"task {i // 4}" for i in range(n_pairs)],
                "split": ["val" if i % 20 == 19 else "train" for i in range(n_pairs)],
                "pos_ctx_row": rows[:, 0],
                "pos_mod_row": rows[:, 1],
                "neg_ctx_row": rows[:, 2],
                "neg_mod_row": rows[:, 3],
                "pos_outcome": np.ones(n_pairs),
                "neg_outcome": np.zeros(n_pairs),
            }
        )
        cache.commit(pack([], []), pairs.to_reader(), {"config": Config().to_dict()})
    return folder


def train_rate(
    workdir: Path, n_pairs: int, epochs: int, device: str, batch_size: int | None = None, max_rows: int | None = None
) -> dict:
    cache = workdir / f"cache-{n_pairs}"
    if not cache.exists():
        make_cache(cache, n_pairs, DIM, max_rows=max_rows)
    config = Config()
    config.train.epochs, config.train.patience, config.train.device = epochs, epochs, device
    config.train.batch_size = batch_size or config.train.batch_size
    out = workdir / f"heads-{n_pairs}-{device}-{config.train.batch_size}"
    summary, seconds = timed(lambda: train_heads(cache, out, config, progress=False))
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [record["pairs_per_s"] for record in log]
    return {
        "pairs": n_pairs,
        "batch_size": config.train.batch_size,
        "train_pairs": summary["n_train"],
        "epochs": len(log),
        "pairs_per_s": statistics.median(rates),
        "epoch_pairs_per_s": rates,
        "wall_seconds": seconds,
    }


def ceiling_rate(
    batch: int, dim: int, cfg: HeadConfig, device: str, chains: int, steps: int, fused: bool = False
) -> float:
    """pairs/s of forward + backward + AdamW through bare Linear layers of the heads' shapes."""
    torch.manual_seed(0)
    model = nn.ModuleList(
        nn.Sequential(nn.Linear(3 * dim, cfg.hidden), nn.Linear(cfg.hidden, cfg.hidden2), nn.Linear(cfg.hidden2, 1))
        for _ in range(chains)
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=fused or None)
    x = torch.randn(2 * batch, 3 * dim, device=device)
    parts = [torch.cat(pair) for pair in zip(*(side.chunk(chains) for side in x.chunk(2)), strict=True)]

    def step() -> None:
        rewards = [head(part).squeeze(-1) for head, part in zip(model, parts, strict=True)]
        loss = sum(F.softplus(-(r[: len(r) // 2] - r[len(r) // 2 :])).mean() for r in rewards)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _, seconds = timed(lambda: [step() for _ in range(steps)])
    return batch * steps / seconds


def run_device(workdir: Path, device: str, sizes, steps: int) -> dict:
    batch, heads = TrainConfig().batch_size, HeadConfig()
    rows = [train_rate(workdir, n, epochs, device) for n, epochs in sizes]
    return {
        "device": device,
        "batch_size": batch,
        "train_heads": rows,
        "ceiling_1_chain": ceiling_rate(batch, DIM, heads, device, 1, steps),
        "ceiling_4_chains": ceiling_rate(batch, DIM, heads, device, 4, steps),
        "ceiling_4_chains_fused_adamw": ceiling_rate(batch, DIM, heads, device, 4, steps, fused=True),
    }


def print_device(result: dict) -> None:
    c1, c4 = result["ceiling_1_chain"], result["ceiling_4_chains"]
    print(f"\nStage-0 training, dim {DIM}, batch {result['batch_size']} pairs, {result['device']}:")
    rows = [
        [
            f"train_heads {r['pairs']:,} pairs",
            r["epochs"],
            r["pairs_per_s"],
            f"{c1 / r['pairs_per_s']:.2f}x",
            f"{c4 / r['pairs_per_s']:.2f}x",
            r["wall_seconds"],
        ]
        for r in result["train_heads"]
    ]
    rows += [
        ["ceiling: bare Linear, 1 chain", "", c1, "1.00x", "", ""],
        ["ceiling: bare Linear, 4 chains", "", c4, "", "1.00x", ""],
        ["  the same, AdamW(fused=True)", "", result["ceiling_4_chains_fused_adamw"], "", "", ""],
    ]
    print(table(["run", "epochs", "pairs/s", "1-chain / it", "4-chain / it", "wall s"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each ceiling")
    parser.add_argument("--max-pairs", type=int, default=100_000, help="skip cache sizes above this")
    args = parser.parse_args()
    started = time.perf_counter()
    cores = use_all_cores()
    busy = warn_if_busy()
    print(f"bench_heads: {cores} threads")
    sizes = [(n, epochs) for n, epochs in SIZES if n <= args.max_pairs]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["cpu"] = run_device(Path(tmp), "cpu", sizes, args.steps)
        if torch.cuda.is_available():
            results["cuda"] = run_device(Path(tmp), "cuda", sizes, args.steps * 10)
    for result in results.values():
        print_device(result)
    print("(x columns: how many times faster the ceiling is than train_heads; the goal is at most 2x)")
    if "cuda" not in results:
        print("CUDA: no GPU here; the GPU rates were not measured.")
    write_results("bench_heads", results, started, busy)


if __name__ == "__main__":
    main()
