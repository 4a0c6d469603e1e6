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
        """Rewards [B] for rows of mixed modules: one matmul chain per module present, not per row.

        The rows are grouped on the host, so indices that live there (as the training loops pass them) cost the
        GPU no synchronisation; indices on the GPU are copied over first."""
        ctx, mod = self.norm(e_ctx.float()), self.norm(e_mod.float())
        x = torch.cat([ctx, mod, ctx * mod], dim=-1)
        out = x.new_empty(x.shape[0])
        groups = module_idx.cpu()
        order = torch.argsort(groups, stable=True)
        for m, rows in enumerate(order.split(torch.bincount(groups, minlength=len(self.heads)).tolist())):
            if len(rows):
                rows = rows.to(x.device, non_blocking=True)
                out.index_copy_(0, rows, self.heads[m](x.index_select(0, rows)).squeeze(-1).to(out.dtype))
        return out


def preference_loss(
    r_pos: torch.Tensor,
    r_neg: torch.Tensor,
    module_idx: torch.Tensor,
    n_modules: int,
    alpha: float,
    margin: float,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley-Terry BCEWithLogits(r+ - r-, 1) + alpha * ReLU(margin - (r+ - r-)): mean per module, then
    mean over the modules present, so a module with few pairs still counts fully.

    `counts` (pairs per module over a whole accumulation window) makes every step of the window use the same
    normalisers: the steps' losses sum to the loss of the window as one batch, so a pair's weight does not
    depend on how the window was packed into steps."""
    diff = (r_pos - r_neg).float()
    per_pair = F.binary_cross_entropy_with_logits(diff, torch.ones_like(diff), reduction="none")
    per_pair = per_pair + alpha * F.relu(margin - diff)
    sums = torch.zeros(n_modules, device=diff.device).index_add(0, module_idx, per_pair)
    if counts is None:
        counts = torch.zeros(n_modules, device=diff.device).index_add(0, module_idx, torch.ones_like(per_pair))
    counts = counts.to(diff.device)
    present = (counts > 0).float()  # arithmetic, not boolean indexing: no device sync
    return (sums / counts.clamp(min=1) * present).sum() / present.sum()
