"""Stage 0: train every module's head from the embedding cache, in seconds, without touching the encoder.

The train split's embeddings are gathered into tensors once (memory-mapped when larger than the budget);
each step scores a batch of pairs of mixed modules with one forward pass per module present.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from pipeline.atomic import atomic_write
from pipeline.cache import ROW_COLUMNS, Cache, MappedRows, open_existing
from pipeline.checkpoint import save_heads
from pipeline.config import FIXED_BY_CACHE, Config, config_from_dict, resolve_config
from pipeline.encoder import pick_device
from pipeline.errors import ModrmError
from pipeline.heads import RewardHeads, preference_loss
from pipeline.reporting import Reporter
from pipeline.training import Optimization, module_counts, param_groups, validation_metrics, windows


@dataclass
class PairSet:
    """One split as tensors: the four embedding rows of each pair and its module index."""

    rows: torch.Tensor  # int64 [n, 4] in ROW_COLUMNS order
    module_idx: torch.Tensor  # int64 [n]

    def __len__(self) -> int:
        return len(self.module_idx)


def module_order(found: set[str], configured: list[str]) -> list[str]:
    """Configured modules first (in their order), then any other module the data has, sorted."""
    return [m for m in configured if m in found] + sorted(found - set(configured))


def codes(table: pa.Table, column: str) -> tuple[np.ndarray, list[str]]:
    """A string column as (int codes, the distinct values): no Python string per row at millions of pairs."""
    encoded = pc.dictionary_encode(table.column(column)).combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def split_sets(table: pa.Table, configured: list[str], cache_dir: Path) -> tuple[list[str], dict[str, PairSet]]:
    """The modules (configured ones first) and the train and val pairs, each as row and module-index tensors."""
    split_code, split_names = codes(table, "split")
    target_code, targets = codes(table, "target_module")
    modules = module_order(set(targets), configured)
    module_idx = np.array([modules.index(m) for m in targets], dtype=np.int64)[target_code]
    split = {name: split_code == i for i, name in enumerate(split_names)}
    sets = {}
    for name in ("train", "val"):
        mask = split.get(name, np.zeros(len(table), dtype=bool))
        if not mask.any():
            raise ModrmError(
                f"{cache_dir}/pairs.parquet: the {name} split is empty (all tasks fell elsewhere); "
                "add tasks, or change data.train_fraction / data.val_fraction / data.split_seed"
            )
        rows = np.stack([table.column(c).to_numpy()[mask] for c in ROW_COLUMNS], axis=1)
        sets[name] = PairSet(torch.from_numpy(rows), torch.from_numpy(module_idx[mask]))
    lacking = [m for i, m in enumerate(modules) if not (sets["train"].module_idx == i).any()]
    if lacking:
        raise ModrmError(
            f"{cache_dir}/pairs.parquet: module(s) {', '.join(lacking)} have no train pairs; "
            "add pairs for them or change the split fractions"
        )
    return modules, sets


class EmbeddingTable:
    """Cache rows as a float16 tensor: in memory when it fits the budget, else gathered from a memmap."""

    def __init__(self, cache: Cache, needed: np.ndarray, budget_bytes: float, device: torch.device):
        self.device = device
        data = cache.embeddings(budget_bytes)
        if isinstance(data, MappedRows):
            self.memmap, self.tensor = data, None
            for lo in range(0, len(needed), 1 << 16):
                cache.check_finite(data[np.sort(needed[lo : lo + (1 << 16)])])
        else:
            self.memmap, self.tensor = None, torch.from_numpy(np.ascontiguousarray(data)).to(device)
            cache.check_finite(data[needed])

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[rows.to(self.device)].float()
        return torch.from_numpy(np.asarray(self.memmap[rows.numpy()])).to(self.device).float()


def pair_rewards(
    model: RewardHeads, table: EmbeddingTable, pairs: PairSet, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_pos, r_neg, module_idx) for the pairs at `idx`: both sides in one forward pass."""
    rows = pairs.rows[idx]
    ctx = table[torch.cat([rows[:, 0], rows[:, 2]])]
    mod = table[torch.cat([rows[:, 1], rows[:, 3]])]
    module_idx = pairs.module_idx[idx]
    rewards = model(ctx, mod, torch.cat([module_idx, module_idx]))  # indices on the host: no device sync
    return rewards[: len(idx)], rewards[len(idx) :], module_idx.to(ctx.device)


@torch.inference_mode()
def validate(model: RewardHeads, table: EmbeddingTable, pairs: PairSet, cfg: Config, batch: int = 4096) -> dict:
    """Val loss (the training objective) and pairwise accuracy, overall and per module."""
    model.eval()
    r_pos, r_neg = [], []
    for lo in range(0, len(pairs), batch):
        p, n, _ = pair_rewards(model, table, pairs, torch.arange(lo, min(lo + batch, len(pairs))))
        r_pos.append(p.cpu())
        r_neg.append(n.cpu())
    return validation_metrics(
        torch.cat(r_pos), torch.cat(r_neg), pairs.module_idx, model.module_names, cfg.heads.alpha, cfg.heads.margin
    )


def train_heads(cache_dir: str | Path, out_dir: str | Path, config: Config, progress: bool = True) -> dict:
    """`modrm train-heads`: returns the best epoch's validation metrics; writes the checkpoint to out_dir."""
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    tc = config.train
    cache, manifest = open_existing(cache_dir)
    if "config" not in manifest:
        raise ModrmError(f"{cache_dir}: the last `modrm embed` into this cache did not finish; run it again")
    built = config_from_dict(manifest["config"], f"{cache_dir}/manifest.json")  # the encoder and split it used
    config = resolve_config([("the given config", config.to_dict())], built, f"cache {cache_dir}", FIXED_BY_CACHE)
    modules, sets = split_sets(cache.read_pairs(["target_module", "split"]), config.data.modules, cache_dir)
    device = pick_device(tc.device)
    used = np.zeros(cache.n_rows, dtype=bool)
    for pairs in sets.values():
        used[pairs.rows.numpy().ravel()] = True
    needed = np.flatnonzero(used)
    emb = EmbeddingTable(cache, needed, tc.memory_budget_gb * 2**30, device)

    torch.manual_seed(tc.seed)
    model = RewardHeads(modules, cache.fingerprint.dim, config.heads).to(device)
    n_train, n_modules = len(sets["train"]), len(modules)
    steps_per_epoch = math.ceil(math.ceil(n_train / tc.batch_size) / tc.grad_accum)
    opt = Optimization(
        param_groups([(model.parameters(), tc.lr)], tc.weight_decay),
        steps_per_epoch * tc.epochs,
        device,
        tc.dtype,
        tc.betas,
        tc.warmup_ratio,
        tc.max_grad_norm,
        fused=True,  # one kernel for all parameters (CPU and CUDA): the unfused loop costs as much as the heads
    )
    generator = torch.Generator().manual_seed(tc.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "metrics.jsonl"
    atomic_write(log_path, lambda tmp: tmp.write_text(""))
    best, best_state, since_best = None, None, 0
    reporter = Reporter(tc.report_to, out_dir / "runs", f"{out_dir.name} (stage 0)", config.to_dict())
    bar = tqdm(total=tc.epochs * n_train, desc="train-heads", unit="pair", disable=not progress, dynamic_ncols=True)
    for epoch in range(1, tc.epochs + 1):
        model.train()
        start = time.perf_counter()
        # running sums stay on the device: a .item() per step would stall the GPU queue every step
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        steps = windows(torch.randperm(n_train, generator=generator).split(tc.batch_size), tc.grad_accum)
        for window in steps:
            counts = module_counts((sets["train"].module_idx[idx] for idx in window), n_modules)
            for idx in window:
                with opt.autocast():
                    r_pos, r_neg, module_idx = pair_rewards(model, emb, sets["train"], idx)
                    loss = preference_loss(
                        r_pos, r_neg, module_idx, n_modules, config.heads.alpha, config.heads.margin, counts
                    )
                opt.backward(loss)
                loss_sum += loss.detach()
                correct += (r_pos > r_neg).float().sum() + 0.5 * (r_pos == r_neg).float().sum()
                bar.update(len(idx))
            opt.step()
        seconds = time.perf_counter() - start
        val = validate(model, emb, sets["val"], config)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / len(steps),  # mean over optimizer steps of the window's loss
            "train_accuracy": correct.item() / n_train,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_modules": val["modules"],
            "lr": opt.lrs[0],
            "seconds": seconds,
            "pairs_per_s": n_train / seconds,
        }
        with log_path.open("a") as log:
            log.write(json.dumps(record) + "\n")
        reporter.log({"train/loss": record["train_loss"], "train/lr": record["lr"]}, epoch)
        reporter.log_validation(val, epoch)
        bar.set_postfix(val_loss=f"{val['loss']:.4f}", val_acc=f"{val['accuracy']:.3f}")
        if best is None or val["loss"] < best["val_loss"]:
            best, since_best = record, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= tc.patience:
                break
    bar.close()
    reporter.close()
    model.load_state_dict(best_state)
    summary = {
        "best_epoch": best["epoch"],
        "epochs_run": epoch,
        "val": {k: best[k] for k in ("val_loss", "val_accuracy", "val_modules")},
        "n_train": n_train,
        "n_val": len(sets["val"]),
    }
    files, hashes = manifest.get("data_files", []), manifest.get("data_sha256", [])
    known = len(files) == len(hashes)  # a cache embedded before hashes were recorded knows only paths
    trained_on = [{"path": p, "sha256": h} for p, h in zip(files, hashes, strict=True)] if known else []
    cache_path = str(cache_dir.resolve())
    save_heads(out_dir, model, config, cache.fingerprint, 0, cache_path, summary, trained_on)
    return summary
