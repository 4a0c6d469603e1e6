"""What both training stages share: parameter groups, the schedule, mixed precision, one optimizer step over an
accumulation window in which every pair weighs the same, and the output folder a new checkpoint takes over.

Each stage's loop reads:

    opt = Optimization(param_groups(...), total_steps, device, dtype, betas, warmup_ratio, max_grad_norm)
    for window in windows(steps, grad_accum):
        counts = module_counts(window, n_modules)     # over the whole window, so packing never changes a weight
        for step in window:
            with opt.autocast():
                loss = preference_loss(r_pos, r_neg, module_idx, ..., counts=counts)
            opt.backward(loss)
        opt.step()
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.atomic import recover
from pipeline.bf16_adamw import BF16AdamW
from pipeline.checkpoint import CONFIG_FILE
from pipeline.errors import ModrmError


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step (None: plain fp32). "auto" is mixed precision on CUDA only: bf16
    where the GPU has it, else fp16 (which needs the grad scaler); on a CPU autocast only slows things down."""
    if setting == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]
    except KeyError:
        raise ModrmError(f"dtype {setting!r}: use auto, float32, bfloat16 or float16") from None


def warmup_then_linear(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def param_groups(parts: Sequence[tuple[Iterable[nn.Parameter], float]], weight_decay: float) -> list[dict]:
    """AdamW groups per (parameters, learning rate): matrices and embedding tables decay, biases and norm
    weights (anything of one dimension) do not, as in nanoGPT and transformers. Frozen parameters are left out."""
    groups = []
    for params, lr in parts:
        params = [p for p in params if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def windows(steps: Sequence, grad_accum: int) -> list[list]:
    """Consecutive steps grouped into optimizer steps; the last window may be shorter."""
    return [list(steps[i : i + grad_accum]) for i in range(0, len(steps), grad_accum)]


def module_counts(module_idx: Iterable[np.ndarray | torch.Tensor], n_modules: int) -> torch.Tensor:
    """Pairs per module over a whole accumulation window: the loss's normalisers."""
    counts = np.zeros(n_modules, dtype=np.float32)
    for idx in module_idx:
        counts += np.bincount(np.asarray(idx), minlength=n_modules)
    return torch.from_numpy(counts)


class Optimization:
    """AdamW, a warmup-then-linear schedule, autocast, the grad scaler (fp16 only) and gradient clipping. bf16
    weights (stage 1's `weights_dtype = "bfloat16"`) take BF16AdamW, whose updates survive bf16's rounding."""

    def __init__(
        self,
        groups: list[dict],
        total_steps: int,
        device: torch.device,
        dtype: str,
        betas: tuple[float, float],
        warmup_ratio: float,
        max_grad_norm: float,
        fused: bool = False,
        seed: int = 0,
    ):
        self.params = [p for g in groups for p in g["params"]]
        if any(p.dtype == torch.bfloat16 for p in self.params):
            self.optimizer = BF16AdamW(groups, betas=betas, seed=seed)
        else:  # fused: one kernel for all parameters; worth it where they are many small tensors (stage 0)
            self.optimizer = torch.optim.AdamW(groups, betas=betas, fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_then_linear(total_steps, warmup_ratio)
        )
        self.device, self.dtype = device, autocast_dtype(dtype, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.max_grad_norm = max_grad_norm
        if self.dtype == torch.float16 and isinstance(self.optimizer, BF16AdamW):
            raise ModrmError("bf16 weights train under bf16 autocast or none: set the dtype to bfloat16 or float32")

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lrs(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def fast_forward(self, steps: int) -> None:
        """The schedule where a run that took `steps` optimizer steps left it (resuming that run)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # stepping the schedule alone is the point here
            for _ in range(steps):
                self.scheduler.step()


def stale_entries(out: Path) -> list[str]:
    """What an older checkpoint left in `out`: a new checkpoint's first commit removes it all, so nothing of the
    old one (an eval cache of another encoder, another run's snapshot, its logs) outlives it. A folder that holds
    files but no checkpoint is the user's: refused, never wiped."""
    if out.exists() and not out.is_dir():
        raise ModrmError(f"--out {out}: is a file; name a folder for the checkpoint")
    if not out.is_dir():
        return []
    recover(out)  # a save a kill interrupted: finished if it had committed, else dropped
    entries = sorted(p.name for p in out.iterdir())
    if entries and CONFIG_FILE not in entries:
        raise ModrmError(
            f"--out {out}: holds files but no modrm checkpoint ({CONFIG_FILE}); a new checkpoint replaces its "
            "folder's whole content, so name a new or empty folder"
        )
    return entries
