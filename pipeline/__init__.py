"""modrm: module-level reward models for multi-module LLM agents.

`from pipeline import RewardModel` scores trajectories with a trained checkpoint (pipeline/reward.py); it is
imported on first use, so the command line starts without loading torch for commands that do not need it.
"""

__version__ = "0.1.0"
__all__ = ["RewardModel"]


def __getattr__(name: str):
    if name == "RewardModel":
        from pipeline.reward import RewardModel

        return RewardModel
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
