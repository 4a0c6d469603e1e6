"""AdamW for bf16 weights: stage 1 at 8 bytes a parameter instead of 16 (`finetune.weights_dtype = "bfloat16"`).

fp32 weights with AdamW cost 16 bytes a parameter (weights, gradients, two moments): 9.4 GiB for the 0.6B encoder
before any activation. In bf16 they cost 8. What bf16 weights lose is the small update: bf16 keeps 8 significant
bits, so a step of 1e-4 of a weight's size rounds to nothing and training stalls. Each update here is computed in
fp32 and rounded to bf16 *stochastically* (up or down with the probabilities that make the rounding exact on
average), so small steps accumulate as they would in fp32. The moments are kept in bf16, rounded to nearest.
Parameters in fp32 (the reward heads) get exactly torch's AdamW.

The rounding noise is drawn from a generator seeded by (seed, step, parameter), so a run resumed from a snapshot
continues bit for bit.
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 22  # elements updated at once: fp32 temporaries of a few MB, however large the parameter


def round_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability (x - down) / (up - down): random low 16 bits added to the fp32
    bit pattern, then cut off (bf16 is fp32's upper half)."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose moments are kept in each parameter's dtype and
    whose bf16 parameters take their updates stochastically rounded. The state has torch's AdamW keys."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay=0.01, seed=0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device)
        return self.generators[device].manual_seed(((self.seed * 1_000_003 + step) * 1_000_003 + index) % (1 << 63))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"])
                lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
                step_size, bias2_sqrt = lr / (1 - beta1**step), math.sqrt(1 - beta2**step)
                gen = self.generator(p.device, step, index) if p.dtype == torch.bfloat16 else None
                views = (t.view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
                for weight, grad, avg, avg_sq in zip(*(v.split(CHUNK) for v in views), strict=True):
                    w32, g32 = weight.float(), grad.float()
                    m32 = avg.float().lerp_(g32, 1 - beta1)
                    v32 = avg_sq.float().mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
                    denom = (v32.sqrt() / bias2_sqrt).add_(group["eps"])
                    w32.mul_(decay).addcdiv_(m32, denom, value=-step_size)
                    weight.copy_(round_stochastic(w32, gen) if gen is not None else w32)
                    avg.copy_(m32)
                    avg_sq.copy_(v32)
