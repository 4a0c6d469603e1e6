"""The training core both stages share: pair weights that packing cannot change, decay groups, the schedule,
length-bucketed steps, and commit (several files replaced together, whatever instant a kill comes)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.atomic as atomic
import pipeline.finetune as ft
from pipeline.atomic import commit, recover
from pipeline.checkpoint import load_checkpoint, read_checkpoint_config
from pipeline.config import HeadConfig
from pipeline.heads import RewardHeads, preference_loss
from pipeline.training import module_counts, param_groups, warmup_then_linear

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"


def test_a_pairs_weight_does_not_depend_on_how_its_window_was_packed():
    """One window of 7 pairs cut into steps two ways: the gradients are those of the window as one batch."""
    torch.manual_seed(0)
    model = RewardHeads(["a", "b", "c"], 8, HeadConfig(hidden=16, hidden2=8, dropout=0.0))
    ctx, mod = torch.randn(14, 8), torch.randn(14, 8)
    module_idx = torch.tensor([0, 0, 1, 2, 0, 1, 0])

    def gradients(packing: list[list[int]]) -> list[torch.Tensor]:
        model.zero_grad()
        counts = module_counts([module_idx[step] for step in packing], 3)
        for step in packing:
            idx = torch.tensor(step)
            r = model(
                torch.cat([ctx[idx], ctx[idx + 7]]), torch.cat([mod[idx], mod[idx + 7]]), module_idx[idx].repeat(2)
            )
            preference_loss(r[: len(idx)], r[len(idx) :], module_idx[idx], 3, 0.1, 0.1, counts).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = gradients([list(range(7))])
    for packing in ([[0, 1, 2], [3, 4, 5, 6]], [[6], [0, 5], [1, 2, 3, 4]]):
        for got, want in zip(gradients(packing), whole, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_norms_and_biases_do_not_decay():
    model = RewardHeads(["a"], 4, HeadConfig(hidden=8, hidden2=4))
    groups = param_groups([(model.parameters(), 1e-3)], 0.01)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name
    assert all(g["lr"] == 1e-3 for g in groups)


def test_warmup_then_linear_schedule():
    factor = warmup_then_linear(10, 0.2)
    assert [round(factor(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def test_length_buckets_pad_less_and_use_every_pair_once(stage0, tmp_path):
    from test_finetune import _setup

    model, _, ckpt = _setup(stage0, False)
    split = ft.load_split([Path(__file__).parent / "fixtures" / "seed_training_pairs.json"], ckpt)
    data = ft.tokenize_pairs(model.encoder, split["train"] + split["val"], ckpt.model.module_names)
    budget = 2048
    steps = ft.plan_steps(data, budget, seed=0, epoch=0)
    assert sorted(np.concatenate(steps).tolist()) == list(range(len(data.module_idx)))
    assert all(data.cost(s) <= budget or len(s) == 1 for s in steps)
    assert [s.tolist() for s in ft.plan_steps(data, budget, 0, 0)] == [s.tolist() for s in steps]  # deterministic
    assert [s.tolist() for s in ft.plan_steps(data, budget, 0, 1)] != [s.tolist() for s in steps]  # per epoch

    def padding(plan) -> float:
        def real(s: np.ndarray) -> int:
            rows = data.rows[s]
            return int(data.contexts.lengths[rows[:, [0, 2]]].sum() + data.modules.lengths[rows[:, [1, 3]]].sum())

        return sum(data.cost(s) for s in plan) / sum(real(s) for s in plan)

    rng = np.random.default_rng(0)  # the old way: shuffled pairs cut greedily
    order, shuffled, current = rng.permutation(len(data.module_idx)), [], []
    for i in order:
        if current and data.cost(np.array([*current, i])) > budget:
            shuffled.append(np.array(current))
            current = []
        current.append(i)
    shuffled.append(np.array(current))
    assert padding(steps) < padding(shuffled)


# ---------------------------------------------------------------------------------------------- commit


def _write(version: str):
    def write(staging: Path) -> None:
        (staging / "a.txt").write_text(version)
        (staging / "folder").mkdir()
        (staging / "folder" / "b.txt").write_text(version)
        (staging / f"only-{version}").mkdir()
        (staging / f"only-{version}" / "c.txt").write_text(version)

    return write


def _state(folder: Path) -> str:
    """The version the folder holds, whole: only-old/ is the old set's alone, only-new/ the new one's."""
    a, b = (folder / "a.txt").read_text(), (folder / "folder" / "b.txt").read_text()
    assert a == b, "a mix of two versions"
    assert sorted(p.name for p in folder.glob("only-*")) == [f"only-{a}"], "a mix of two versions"
    return a


@pytest.mark.parametrize("crash_at", range(1, 16))
def test_commit_leaves_the_old_set_or_the_new_one_whatever_instant_a_kill_comes(tmp_path, monkeypatch, crash_at):
    """The commit replaces two entries, adds one and removes one; it is killed at one file operation, then the
    recovery that follows is killed at the same one, and the next recovery must still find one whole version."""
    commit(tmp_path, ["a.txt", "folder", "only-old"], _write("old"))
    calls = []
    real_replace, real_rmtree, real_fsync = os.replace, shutil.rmtree, os.fsync

    def crash(real):
        def op(*args, **kwargs):
            calls.append(1)
            if len(calls) == crash_at:
                raise KeyboardInterrupt  # the process dies here: nothing after this runs
            return real(*args, **kwargs)

        return op

    monkeypatch.setattr(atomic.os, "replace", crash(real_replace))
    monkeypatch.setattr(atomic.shutil, "rmtree", crash(real_rmtree))
    monkeypatch.setattr(atomic.os, "fsync", crash(real_fsync))
    try:
        commit(tmp_path, ["a.txt", "folder", "only-new"], _write("new"), remove=["only-old"])
        finished = True
    except KeyboardInterrupt:
        finished = False
    calls.clear()
    with contextlib.suppress(KeyboardInterrupt):
        recover(tmp_path)
    monkeypatch.undo()
    recover(tmp_path)  # what the next reader does
    assert _state(tmp_path) in ({"new"} if finished else {"old", "new"})
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing left behind


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
@pytest.mark.parametrize("planted", ["runs", "runs/wandb"])
def test_the_loggers_never_write_through_a_link(tmp_path, backend, planted):
    """`<out>/runs` (or wandb's folder in it) planted as a link elsewhere: refused before a logger writes."""
    from pipeline.errors import ModrmError
    from pipeline.reporting import Reporter

    elsewhere, runs = tmp_path / "elsewhere", tmp_path / "out" / "runs"
    elsewhere.mkdir()
    runs.parent.mkdir()
    if planted == "runs/wandb":
        runs.mkdir()
    (tmp_path / "out" / planted).symlink_to(elsewhere)
    with pytest.raises(ModrmError, match="is a symbolic link"):
        Reporter([backend], runs)
    assert not any(elsewhere.iterdir())


def test_report_to_tensorboard_streams_both_stages(stage0, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.errors import ModrmError
    from pipeline.train_heads import train_heads

    def scalars(folder: Path) -> dict[str, list[float]]:
        events = EventAccumulator(str(folder))
        events.Reload()
        return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    config = read_checkpoint_config(stage0)[1]
    config.train.report_to, config.train.epochs = ["tensorboard"], 2
    train_heads(Path(load_checkpoint(stage0).cache), tmp_path / "s0", config, progress=False)
    logged = scalars(tmp_path / "s0" / "runs")
    log = [json.loads(line) for line in (tmp_path / "s0" / "metrics.jsonl").read_text().splitlines()]
    assert logged["val/loss"] == pytest.approx([r["val_loss"] for r in log])
    assert {"train/loss", "train/lr", "val/accuracy"} <= set(logged)

    settings = {"finetune": {"epochs": 1, "token_budget": 4096, "report_to": ["tensorboard"]}}
    result = ft.finetune(stage0, [SEED_PAIRS], tmp_path / "s1", settings, progress=False)
    logged = scalars(tmp_path / "s1" / "runs")
    assert logged["train/loss"] == pytest.approx([s["loss"] for s in result["steps"]])
    assert logged["val/accuracy"] == pytest.approx([result["history"][-1]["val_accuracy"]])
    with pytest.raises(ModrmError, match="unknown backend"):
        ft.finetune(stage0, [SEED_PAIRS], tmp_path / "s2", {"finetune": {"report_to": ["mlflow"]}}, progress=False)


class FakeWandb:
    """What modrm asks of the wandb module: init -> a run that logs (values, step) and finishes."""

    def __init__(self):
        self.runs: list[dict] = []

    def init(self, project: str, name: str | None, dir: str, config: dict):
        run = {"project": project, "name": name, "dir": dir, "config": config, "logged": [], "finished": False}
        self.runs.append(run)

        class Run:
            def log(self, values: dict, step: int) -> None:
                run["logged"].append((step, dict(values)))

            def finish(self) -> None:
                run["finished"] = True

        return Run()


def test_report_to_wandb_streams_both_stages(stage0, tmp_path, monkeypatch):
    from pipeline.train_heads import train_heads

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "rm-runs")
    config = read_checkpoint_config(stage0)[1]
    config.train.report_to, config.train.epochs = ["wandb"], 2
    train_heads(Path(load_checkpoint(stage0).cache), tmp_path / "s0", config, progress=False)
    settings = {"finetune": {"epochs": 1, "token_budget": 4096, "report_to": ["wandb"]}}
    result = ft.finetune(stage0, [SEED_PAIRS], tmp_path / "s1", settings, progress=False)
    heads, stage1 = fake.runs
    assert (heads["project"], heads["name"], stage1["name"]) == ("rm-runs", "s0 (stage 0)", "s1 (stage 1)")
    assert heads["finished"] and stage1["finished"] and stage1["config"]["finetune"]["epochs"] == 1
    log = [json.loads(line) for line in (tmp_path / "s0" / "metrics.jsonl").read_text().splitlines()]
    assert [v["val/loss"] for _, v in heads["logged"] if "val/loss" in v] == pytest.approx([r["val_loss"] for r in log])
    losses = [(step, v["train/loss"]) for step, v in stage1["logged"] if "train/loss" in v]
    assert losses == [(s["step"], pytest.approx(s["loss"])) for s in result["steps"]]


def test_report_to_wandb_writes_an_offline_run(stage0, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from pipeline.train_heads import train_heads

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = read_checkpoint_config(stage0)[1]
    config.train.report_to, config.train.epochs = ["wandb"], 1
    train_heads(Path(load_checkpoint(stage0).cache), tmp_path / "s0", config, progress=False)
    assert list((tmp_path / "s0" / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_train_heads_replaces_an_older_checkpoints_files_and_refuses_other_folders(stage0, tmp_path):
    """Stage 0 into the folder of a stage-1 checkpoint: its encoder, eval cache, snapshot and logs go in the commit
    that writes the new checkpoint; a folder of other files is refused before any work."""
    from pipeline.errors import ModrmError
    from pipeline.train_heads import train_heads

    out, cache = tmp_path / "out", Path(load_checkpoint(stage0).cache)
    shutil.copytree(stage0, out)
    for name in ("encoder", "cache", "resume", "runs"):
        (out / name).mkdir()
        (out / name / "old.txt").write_text("old")
    (out / "finetune_history.json").write_text("{}")
    config = read_checkpoint_config(stage0)[1]
    config.train.epochs = 1
    train_heads(cache, out, config, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "heads.safetensors",
        "metrics.json",
        "metrics.jsonl",
    ]
    assert load_checkpoint(out).encoder_folder is None

    (tmp_path / "mine" / "notes.txt").parent.mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ModrmError, match="holds files but no modrm checkpoint"):
        train_heads(cache, tmp_path / "mine", config, progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
