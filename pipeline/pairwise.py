"""Preference pairs as both training stages and eval see them: the split every command agrees on, a split's pairs
as rows of embedding tables, the one way to score both sides of pairs, the tie rule, and validation.

A pair is a row of four texts, in this order: positive context, positive module text, negative context, negative
module text. `Embed` callables turn row numbers into embeddings: a cache table in stage 0 and eval, the encoder
in stage 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pipeline.config import DataConfig, HeadConfig
from pipeline.data import SPLITS, assign_split
from pipeline.heads import RewardHeads, preference_loss

Embed = Callable[[torch.Tensor], torch.Tensor]  # row numbers (int64, on the host) -> embeddings [n, dim]
AS_GIVEN = ((0, 1), (2, 3))  # the (context, module text) columns of each side scored: r+, then r-
SWAPPED = ((0, 3), (2, 1))  # module texts swapped: the positive context with the negative text, and the reverse


# ---------------------------------------------------------------------------------------------- splits


def split_by_group(keys: Iterable[str], data: DataConfig) -> dict[str, str]:
    """Each split key's split (train, val or test): `assign_split`'s draw, mended where a split the fractions
    give room for came out empty, as the few groups of a small data set often leave one. With 3 groups or more
    every such split gets one: the first group (by key) of the fullest split moves to it. With fewer, train gets
    one and val may stay empty: training then runs without validation. A function of the set of keys alone, so
    stage 0, stage 1 and eval split the same data alike."""
    split = {k: assign_split(k, data.train_fraction, data.val_fraction, data.split_seed) for k in set(keys)}
    tf, vf = data.train_fraction, data.val_fraction
    room = {"train": tf > 0, "val": vf > 0, "test": tf + vf < 1}  # as `assign_split` compares
    wanted = [s for s in SPLITS if room[s]] if len(split) >= 3 else ["train"]
    for target in wanted:
        counts = Counter(split.values())
        if split and not counts[target]:
            donor = max(reversed(SPLITS), key=lambda s: counts[s])  # the fullest; on a tie test gives first
            split[min(k for k, s in split.items() if s == donor)] = target
    return split


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class PairSet:
    """Pairs as tensors: each pair's four rows and the index of its module's head."""

    rows: torch.Tensor  # int64 [n, 4]: pos ctx, pos mod, neg ctx, neg mod
    module_idx: torch.Tensor  # int64 [n]

    def __len__(self) -> int:
        return len(self.module_idx)

    def __getitem__(self, idx: slice | torch.Tensor) -> PairSet:
        return PairSet(self.rows[idx], self.module_idx[idx])


def side_rewards(
    heads: RewardHeads, pairs: PairSet, context: Embed, module: Embed, sides: Sequence[tuple[int, int]] = AS_GIVEN
) -> tuple[torch.Tensor, ...]:
    """The rewards of each side of `pairs` (by default r+ then r-), every side in one pass of the heads. The
    module indices stay on the host, where the heads group rows without a device sync."""
    ctx = context(torch.cat([pairs.rows[:, c] for c, _ in sides]))
    mod = module(torch.cat([pairs.rows[:, m] for _, m in sides]))
    return heads(ctx, mod, pairs.module_idx.repeat(len(sides))).split(len(pairs))


def wins(r_pos, r_neg):
    """1 where the positive side wins, 1/2 on a tie, 0 where it loses: the tie rule of every accuracy modrm
    reports (numpy arrays and torch tensors alike), so identical sides never decide a comparison by noise."""
    return (r_pos > r_neg) + 0.5 * (r_pos == r_neg)


# ---------------------------------------------------------------------------------------------- validation


@contextmanager
def scoring(model: torch.nn.Module) -> Iterator[None]:
    """No dropout and no autograd for a scoring pass; the model's mode is given back after (training goes on)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def validate(
    heads: RewardHeads, pairs: PairSet, context: Embed, module: Embed, cfg: HeadConfig, batch: int = 4096
) -> dict:
    """Val loss (the training objective) and pairwise accuracy, overall and per module."""
    with scoring(heads):
        scored = [side_rewards(heads, pairs[lo : lo + batch], context, module) for lo in range(0, len(pairs), batch)]
    r_pos, r_neg = (torch.cat([s[side].float().cpu() for s in scored]) for side in (0, 1))
    return validation_metrics(r_pos, r_neg, pairs.module_idx, heads.module_names, cfg)


def validation_metrics(
    r_pos: torch.Tensor, r_neg: torch.Tensor, module_idx: torch.Tensor, names: Sequence[str], cfg: HeadConfig
) -> dict:
    n_modules = len(names)

    def measure(sel: torch.Tensor | slice) -> dict:
        loss = preference_loss(r_pos[sel], r_neg[sel], module_idx[sel], n_modules, cfg.alpha, cfg.margin).item()
        return {"loss": loss, "accuracy": wins(r_pos[sel], r_neg[sel]).mean().item()}

    per_module = {}
    for i, name in enumerate(names):
        sel = module_idx == i
        if sel.any():
            per_module[name] = {"n_pairs": int(sel.sum())} | measure(sel)
    return measure(slice(None)) | {"modules": per_module}


def val_record(val: dict | None) -> dict:
    """An epoch record's validation fields; None where the data has no val split."""
    return {f"val_{k}": None if val is None else val[k] for k in ("loss", "accuracy", "modules")}


def improves(record: dict, best: dict | None) -> bool:
    """Whether an epoch's record becomes the best: a lower val loss than the best so far, or, with no val split
    to judge by, simply the latest."""
    return best is None or record["val_loss"] is None or record["val_loss"] < best["val_loss"]
