"""Stage 0: train every module's head from the embedding cache, in seconds, without touching the encoder.

`train_heads` reads as three steps: `setup` (the cache's pairs split by group, their embeddings gathered into
tensors once, memory-mapped when larger than the budget), `train` (epochs of steps over batches of pairs of mixed
modules, one forward pass per module present; early stopping on val loss) and `save` (the best epoch's heads,
committed together with the epoch log, replacing whatever an older checkpoint had in the folder).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from pipeline.atomic import commit
from pipeline.cache import ROW_COLUMNS, Cache, MappedRows, open_existing
from pipeline.checkpoint import HEADS_FILES, write_heads
from pipeline.config import FIXED_BY_CACHE, Config, DataConfig, config_from_dict, resolve_config
from pipeline.data import SPLITS
from pipeline.encoder import pick_device
from pipeline.errors import ModrmError
from pipeline.heads import RewardHeads, preference_loss
from pipeline.pairwise import PairSet, improves, side_rewards, split_by_group, val_record, validate, wins
from pipeline.reporting import RUNS_DIR, Reporter
from pipeline.training import Optimization, param_groups, stale_entries, windows

EPOCH_LOG = "metrics.jsonl"  # one record per epoch, beside the checkpoint


def module_order(found: set[str], configured: list[str]) -> list[str]:
    """Configured modules first (in their order), then any other module the data has, sorted."""
    return [m for m in configured if m in found] + sorted(found - set(configured))


def codes(table: pa.Table, column: str) -> tuple[np.ndarray, list[str]]:
    """A string column as (int codes, the distinct values): no Python string per row at millions of pairs."""
    encoded = pc.dictionary_encode(table.column(column)).combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def split_sets(
    table: pa.Table, configured: list[str], data: DataConfig, cache_dir: Path
) -> tuple[list[str], PairSet, PairSet | None]:
    """The modules (configured ones first), the train pairs and the val pairs (None: the data has no val split),
    split by group as every command splits them (`split_by_group`)."""
    if not len(table):
        raise ModrmError(f"{cache_dir}/pairs.parquet: holds no pairs; embed a pairs file into the cache")
    group_code, groups = codes(table, "group")
    split_of = split_by_group(groups, data)
    split_code = np.array([SPLITS.index(split_of[g]) for g in groups])[group_code]
    target_code, targets = codes(table, "target_module")
    modules = module_order(set(targets), configured)
    module_idx = np.array([modules.index(m) for m in targets], dtype=np.int64)[target_code]
    rows = np.stack([table.column(c).to_numpy() for c in ROW_COLUMNS], axis=1)

    def pairs(split: str) -> PairSet | None:
        mask = split_code == SPLITS.index(split)
        return PairSet(torch.from_numpy(rows[mask]), torch.from_numpy(module_idx[mask])) if mask.any() else None

    train, val = pairs("train"), pairs("val")
    lacking = [m for i, m in enumerate(modules) if not (train.module_idx == i).any()]
    if lacking:
        raise ModrmError(
            f"{cache_dir}/pairs.parquet: module(s) {', '.join(lacking)} have no train pairs; "
            "add pairs for them or change the split fractions"
        )
    return modules, train, val


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


@dataclass
class Run:
    """What a train-heads run works with, made once by `setup`."""

    config: Config  # resolved over the cache's own: its encoder and split
    cache: Cache
    manifest: dict
    modules: list[str]
    train: PairSet
    val: PairSet | None  # None: the data has no val split
    table: EmbeddingTable
    model: RewardHeads
    opt: Optimization
    device: torch.device
    # the train pairs where the step uses them: rows beside the table (the device, or the host for a memmap), module
    # indices on the device for the loss; the host's `train.module_idx` groups the rows by head without a sync
    train_rows: torch.Tensor = field(init=False)
    train_module_idx: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        in_memory = getattr(self.table, "tensor", None) is not None  # a memmap is gathered on the host
        self.train_rows = self.train.rows.to(self.device) if in_memory else self.train.rows
        self.train_module_idx = self.train.module_idx.to(self.device)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Embeddings of cache rows (contexts and module texts share the table)."""
        return self.table[rows]

    def batch(self, host_idx: torch.Tensor, device_idx: torch.Tensor) -> tuple[PairSet, torch.Tensor]:
        """A step's pairs and their module indices on the device, taken without copying anything to the device, so
        the host queues step after step while the GPU works (an index copied per step waits for the GPU)."""
        rows = self.train_rows[device_idx if self.train_rows.device == self.device else host_idx]
        return PairSet(rows, self.train.module_idx[host_idx]), self.train_module_idx[device_idx]


def train_heads(cache_dir: str | Path, out_dir: str | Path, config: Config, progress: bool = True) -> dict:
    """`modrm train-heads`: returns the summary of the best epoch (the last one where there is no val split);
    writes the checkpoint to out_dir."""
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    stale = stale_entries(out_dir)  # a folder that is not a checkpoint's is refused before any work
    run = setup(cache_dir, config)
    with tempfile.TemporaryDirectory(prefix="modrm-runs-") as runs:  # the logs join the checkpoint in its commit
        log, best = train(run, Path(runs), f"{out_dir.name} (stage 0)", progress)
        summary = {
            "best_epoch": best["epoch"],
            "epochs_run": len(log),
            "val": None if run.val is None else {k: best[k] for k in ("val_loss", "val_accuracy", "val_modules")},
            "n_train": len(run.train),
            "n_val": 0 if run.val is None else len(run.val),
        }
        save(run, cache_dir, out_dir, summary, log, Path(runs), stale)
    return summary


def setup(cache_dir: Path, config: Config) -> Run:
    """The cache's config, pairs and embeddings; the heads and their optimizer."""
    cache, manifest = open_existing(cache_dir)
    if "config" not in manifest:
        raise ModrmError(f"{cache_dir}: the last `modrm embed` into this cache did not finish; run it again")
    built = config_from_dict(manifest["config"], f"{cache_dir}/manifest.json")  # the encoder and split it used
    config = resolve_config([("the given config", config.to_dict())], built, f"cache {cache_dir}", FIXED_BY_CACHE)
    tc = config.train
    pairs = cache.read_pairs(["target_module", "group"])
    modules, train, val = split_sets(pairs, config.data.modules, config.data, cache_dir)
    device = pick_device(tc.device)
    used = np.zeros(cache.n_rows, dtype=bool)
    for split in (train, val):
        if split is not None:
            used[split.rows.numpy().ravel()] = True
    needed = np.flatnonzero(used)
    emb = EmbeddingTable(cache, needed, tc.memory_budget_gb * 2**30, device)

    torch.manual_seed(tc.seed)
    model = RewardHeads(modules, cache.fingerprint.dim, config.heads).to(device)
    steps_per_epoch = math.ceil(math.ceil(len(train) / tc.batch_size) / tc.grad_accum)
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
    return Run(config, cache, manifest, modules, train, val, emb, model, opt, device)


def train(run: Run, runs: Path, run_name: str, progress: bool) -> tuple[list[dict], dict]:
    """Epochs until the last, or until val loss has not improved for `patience` epochs; the heads end with the
    best epoch's weights. Returns the epoch log and the best epoch's record."""
    tc = run.config.train
    generator = torch.Generator().manual_seed(tc.seed)
    reporter = Reporter(tc.report_to, runs, run_name, run.config.to_dict())
    bar = tqdm(
        total=tc.epochs * len(run.train), desc="train-heads", unit="pair", disable=not progress, dynamic_ncols=True
    )
    log: list[dict] = []
    best, best_state = None, None
    for epoch in range(1, tc.epochs + 1):
        record = {"epoch": epoch} | train_epoch(run, generator, bar)
        val = None if run.val is None else validate(run.model, run.val, run.lookup, run.lookup, run.config.heads)
        record |= val_record(val)
        log.append(record)
        reporter.log({"train/loss": record["train_loss"], "train/lr": record["lr"]}, epoch)
        if val is not None:
            reporter.log_validation(val, epoch)
            bar.set_postfix(val_loss=f"{val['loss']:.4f}", val_acc=f"{val['accuracy']:.3f}")
        if improves(record, best):
            best = record
            best_state = None if val is None else {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        elif epoch - best["epoch"] >= tc.patience:
            break
    bar.close()
    reporter.close()
    if best_state is not None:
        run.model.load_state_dict(best_state)
    return log, best


def train_epoch(run: Run, generator: torch.Generator, bar: tqdm) -> dict:
    """One pass over the train pairs in shuffled batches, `grad_accum` batches to an optimizer step."""
    heads, n_train, n_modules = run.config.heads, len(run.train), len(run.modules)
    run.model.train()
    start = time.perf_counter()
    # running sums stay on the device: a .item() per step would stall the GPU queue every step
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device)
    order = torch.randperm(n_train, generator=generator)
    size = run.config.train.batch_size
    batches = list(zip(order.split(size), order.to(run.device).split(size), strict=True))  # one copy an epoch
    steps = windows(batches, run.config.train.grad_accum)
    for window in steps:
        in_window = torch.cat([run.train_module_idx[d] for _, d in window])
        ones = torch.ones(len(in_window), device=run.device)
        counts = torch.zeros(n_modules, device=run.device).index_add_(0, in_window, ones)  # bincount would sync
        for host_idx, device_idx in window:
            batch, module_idx = run.batch(host_idx, device_idx)
            with run.opt.autocast():
                r_pos, r_neg = side_rewards(run.model, batch, run.lookup, run.lookup)
                loss = preference_loss(r_pos, r_neg, module_idx, n_modules, heads.alpha, heads.margin, counts)
            run.opt.backward(loss)
            loss_sum += loss.detach()
            correct += wins(r_pos, r_neg).sum()
            bar.update(len(host_idx))
        run.opt.step()
    seconds = time.perf_counter() - start
    return {
        "train_loss": loss_sum.item() / len(steps),  # mean over optimizer steps of the window's loss
        "train_accuracy": correct.item() / n_train,
        "lr": run.opt.lrs[0],
        "seconds": seconds,
        "pairs_per_s": n_train / seconds,
    }


def save(
    run: Run, cache_dir: Path, out_dir: Path, summary: dict, log: list[dict], runs: Path, stale: list[str]
) -> None:
    """The heads, the epoch log and the run's logs, committed together; whatever else an older checkpoint left in
    the folder is removed in the same commit."""
    manifest = run.manifest
    files, hashes = manifest.get("data_files", []), manifest.get("data_sha256", [])
    known = len(files) == len(hashes)  # a cache embedded before hashes were recorded knows only paths
    trained_on = [{"path": p, "sha256": h} for p, h in zip(files, hashes, strict=True)] if known else []
    names = [*HEADS_FILES, EPOCH_LOG, *([RUNS_DIR] if any(runs.iterdir()) else [])]

    def write(staging: Path) -> None:
        cache_path = str(cache_dir.resolve())
        write_heads(staging, run.model, run.config, run.cache.fingerprint, 0, cache_path, summary, trained_on)
        (staging / EPOCH_LOG).write_text("".join(json.dumps(record) + "\n" for record in log))
        if RUNS_DIR in names:
            shutil.copytree(runs, staging / RUNS_DIR, symlinks=True)

    commit(out_dir, names, write, remove=[n for n in stale if n not in names])
