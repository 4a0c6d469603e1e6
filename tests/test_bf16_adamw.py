"""BF16AdamW (`finetune.weights_dtype = "bfloat16"`): torch's AdamW for fp32 parameters, unbiased rounding for bf16
ones, so that updates far below bf16's resolution still add up, and a step that a resumed run repeats exactly."""

from __future__ import annotations

import pytest
import torch

from pipeline.bf16_adamw import BF16AdamW, round_stochastic
from pipeline.errors import ModrmError
from pipeline.training import Optimization


def test_fp32_parameters_step_as_torch_adamw() -> None:
    torch.manual_seed(0)
    ours, bias = torch.randn(300, 7, requires_grad=True), torch.randn(7, requires_grad=True)
    theirs, bias_ref = (t.detach().clone().requires_grad_(True) for t in (ours, bias))

    def groups(w: torch.Tensor, b: torch.Tensor) -> list[dict]:
        return [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]

    opt = BF16AdamW(groups(ours, bias), lr=1e-2, betas=(0.8, 0.99))
    ref = torch.optim.AdamW(groups(theirs, bias_ref), lr=1e-2, betas=(0.8, 0.99))
    for step in range(5):
        grad = torch.randn(300, 7)
        for w, b, o in ((ours, bias, opt), (theirs, bias_ref, ref)):
            w.grad, b.grad = grad.clone(), grad[step].clone()
            o.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, bias_ref, rtol=1e-6, atol=1e-7)
    assert opt.state[ours].keys() == ref.state[theirs].keys()


def test_stochastic_rounding_is_exact_on_average() -> None:
    x = torch.full((200_000,), 1 + 2**-10)  # a quarter of the way from bf16's 1.0 to its next value, 1 + 2**-7
    rounded = round_stochastic(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1 + 2**-7}
    assert abs(rounded.mean().item() - x[0].item()) < 2e-5
    negative = round_stochastic(-x, torch.Generator().manual_seed(0)).float()
    assert abs(negative.mean().item() + x[0].item()) < 2e-5


def test_updates_below_bf16_resolution_accumulate_as_in_fp32() -> None:
    """Weight decay alone at lr 1e-3, weight decay 0.01: each step shrinks a weight by 1e-5 of itself, 400 times
    below bf16's resolution. Rounded to nearest the weights would never move; here they follow fp32."""
    weights = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
    opt = BF16AdamW([weights], lr=1e-3, weight_decay=0.01)
    for _ in range(500):
        weights.grad = torch.zeros_like(weights)
        opt.step()
    expected = (1 - 1e-5) ** 500  # 0.995
    assert abs(weights.float().mean().item() - expected) < 2e-4
    assert opt.state[weights]["exp_avg"].dtype == torch.bfloat16


def test_a_step_repeats_exactly_from_the_same_state() -> None:
    """What resuming from a snapshot needs: the rounding noise is a function of (seed, step, parameter)."""
    torch.manual_seed(0)
    start, grad = torch.randn(1000, dtype=torch.bfloat16), torch.randn(1000, dtype=torch.bfloat16)
    results = []
    for _ in range(2):
        w = start.clone().requires_grad_(True)
        opt = BF16AdamW([w], lr=1e-2, seed=3)
        for _ in range(3):
            w.grad = grad.clone()
            opt.step()
        results.append(w.detach())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], start)


def test_bf16_weights_take_bf16_adamw_and_refuse_fp16_autocast() -> None:
    weights = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    opt = Optimization([{"params": [weights]}], 10, torch.device("cpu"), "bfloat16", (0.9, 0.999), 0.1, 1.0)
    assert isinstance(opt.optimizer, BF16AdamW)
    with pytest.raises(ModrmError, match="bf16 weights"):
        Optimization([{"params": [weights]}], 10, torch.device("cpu"), "float16", (0.9, 0.999), 0.1, 1.0)
