"""Adapters for RL frameworks that call a running `modrm serve` (TRL takes `RewardModel.as_reward_function`)."""
