"""TRL for real: GRPOTrainer runs 2 steps on the CPU with a tiny random causal LM built on the fly and modrm's
reward function, and the rewards it logs are modrm's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from pipeline import RewardModel

pytestmark = pytest.mark.slow  # training runs, subprocesses or many examples: `make test-fast` skips them

# a word-level vocabulary of module tags and filler, so random generations are (often) tagged trajectories
WORDS = ["<pad>", "<eos>", "<unk>", "Round", "1:", "2:", "<plan>", "</plan>", "<action>", "</action>"]
WORDS += ["<reflection>", "</reflection>", "read", "the", "logs", "fix", "leak", "check", "cache", "retry"]


def tiny_policy() -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return Qwen3ForCausalLM(config), hf_tokenizer


def test_grpo_trainer_logs_modrm_rewards(stage0: Path, tmp_path: Path) -> None:
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    rm = RewardModel.load(stage0, device="cpu")
    reward_function = rm.as_reward_function()
    calls = []

    def recorded(prompts, completions, **kwargs):
        rewards = reward_function(prompts, completions, **kwargs)
        calls.append((list(prompts), list(completions), rewards))
        return rewards

    recorded.__name__ = reward_function.__name__
    model, tokenizer = tiny_policy()
    prompts = datasets.Dataset.from_dict({"prompt": ["read the logs", "fix the leak", "check the cache", "retry"] * 2})
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=[recorded], args=args, train_dataset=prompts, processing_class=tokenizer
    )
    trainer.train()

    assert len(calls) == 2 and any(r is not None for _, _, rewards in calls for r in rewards)
    for prompts_, completions, rewards in calls:  # what TRL got is modrm's reward of (task, trajectory)
        items = [{"task": p, "trajectory": c} for p, c in zip(prompts_, completions, strict=True)]
        want = rm.reward(items)
        assert [r is None for r in rewards] == [w is None for w in want]
        assert [r for r in rewards if r is not None] == pytest.approx([w for w in want if w is not None], abs=1e-6)
    logged = [h["rewards/modrm_reward/mean"] for h in trainer.state.log_history if "rewards/modrm_reward/mean" in h]
    expected = [np.nanmean([math.nan if r is None else r for r in rewards]) for _, _, rewards in calls]
    assert logged == pytest.approx(expected, abs=1e-6, nan_ok=True)
