"""The reward model on top of embeddings: a shared LayerNorm, one MLP head per module, and the loss.

A head scores concat(e_ctx, e_mod, e_ctx * e_mod): the context alone cannot tell a good module output
from a bad one, the product term lets the head compare the two directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import HeadConfig


def make_head(dim: int, cfg: HeadConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(3 * dim, cfg.hidden),
        nn.GELU(),
        nn.LayerNorm(cfg.hidden),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, cfg.hidden2),
        nn.GELU(),
        nn.LayerNorm(cfg.hidden2),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden2, 1),
    )


class RewardHeads(nn.Module):
    """One scalar reward per module; module names are data (their order is the head index)."""

    def __init__(self, module_names: Sequence[str], dim: int, cfg: HeadConfig):
        super().__init__()
        self.module_names = list(module_names)
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList(make_head(dim, cfg) for _ in self.module_names)

    def forward(self, e_ctx: torch.Tensor, e_mod: torch.Tensor, module_idx: torch.Tensor) -> torch.Tensor:
        """Rewards [B] for rows of mixed modules: one matmul chain per module present, not per row."""
        ctx, mod = self.norm(e_ctx.float()), self.norm(e_mod.float())
        x = torch.cat([ctx, mod, ctx * mod], dim=-1)
        out = x.new_empty(x.shape[0])
        for m in module_idx.unique().tolist():
            sel = module_idx == m
            out[sel] = self.heads[m](x[sel]).squeeze(-1).to(out.dtype)
        return out


def preference_loss(
    r_pos: torch.Tensor, r_neg: torch.Tensor, module_idx: torch.Tensor, n_modules: int, alpha: float, margin: float
) -> torch.Tensor:
    """Bradley-Terry BCEWithLogits(r+ - r-, 1) + alpha * ReLU(margin - (r+ - r-)): mean per module, then
    mean over the modules in the batch, so a module with few pairs still counts fully."""
    diff = (r_pos - r_neg).float()
    per_pair = F.binary_cross_entropy_with_logits(diff, torch.ones_like(diff), reduction="none")
    per_pair = per_pair + alpha * F.relu(margin - diff)
    sums = torch.zeros(n_modules, device=diff.device).index_add(0, module_idx, per_pair)
    counts = torch.bincount(module_idx, minlength=n_modules)
    present = counts > 0
    return (sums[present] / counts[present]).mean()
