"""`modrm score` on a tiny random Qwen3: rewards equal the heads on independently computed embeddings."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from in_process import modrm

from pipeline.checkpoint import load_checkpoint
from pipeline.encoder import Encoder, describe
from pipeline.errors import ModrmError
from pipeline.finetune import finetune
from pipeline.score import score_file
from pipeline.trajectory import module_view

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"
MODULES = ["reflection", "planner", "executor", "memory"]


def strip_memory(trajectory: str) -> str:
    return re.sub(r"<memory (query|result|store)>.*?</memory \1>\n?", "", trajectory, flags=re.DOTALL)


def trajectories() -> list[dict]:
    """Both sides of a few seed pairs, one trajectory without memory tags, and one duplicate."""
    pairs = json.loads(SEED_PAIRS.read_text())[::4]
    records = [
        {"id": f"{p['pair_id']}/{side}", "task": p["task"], "trajectory": p[side]["trajectory_full_context"]}
        for p in pairs
        for side in ("positive", "negative")
    ]
    no_memory = {**records[0], "id": "no-memory", "trajectory": strip_memory(records[0]["trajectory"])}
    duplicate = {**records[1], "id": "duplicate"}
    return [*records, no_memory, duplicate]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_rewards(ckpt, records: list[dict], encoder: Encoder) -> list[dict]:
    """Each record's rewards, from the encoder and the heads directly (no pipeline.score code)."""
    template = ckpt.config.encoder.context_template
    modules = ckpt.model.module_names
    contexts = [template.format(task=r["task"], context=r["trajectory"]) for r in records]
    heads = [template.split("{context}")[0].format(task=r["task"]) for r in records]
    ctx = encoder.encode(contexts, "context", heads=heads)
    out = []
    for i, record in enumerate(records):
        views = {m: module_view(record["trajectory"], m) for m in modules}
        present = [m for m in modules if views[m]]
        mod = encoder.encode([views[m] for m in present], "module")
        with torch.inference_mode():
            r = ckpt.model(
                torch.from_numpy(np.repeat(ctx[i : i + 1], len(present), axis=0)),
                torch.from_numpy(mod),
                torch.tensor([modules.index(m) for m in present]),
            )
        out.append({m: (float(r[present.index(m)]) if m in present else None) for m in modules})
    return out


def assert_rewards_close(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for m in w:
            assert (g[m] is None) == (w[m] is None), m
            if w[m] is not None:
                assert g[m] == pytest.approx(w[m], rel=1e-4, abs=1e-5), m


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("inputs") / "trajectories.jsonl", trajectories())


@pytest.fixture(scope="module")
def scored(stage0, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "rewards.jsonl"
    n = score_file(stage0, inputs, out, progress=False)
    return n, read_jsonl(out)


def test_one_line_per_input_with_every_module(scored):
    n, lines = scored
    records = trajectories()
    assert n == len(records) == len(lines)
    assert [line["id"] for line in lines] == [r["id"] for r in records]
    for line in lines:
        assert set(line["rewards"]) == set(MODULES)


def test_rewards_equal_the_heads_on_independent_embeddings(stage0, scored):
    ckpt = load_checkpoint(stage0)
    cfg = dataclasses.replace(ckpt.config.encoder, device="cpu")
    encoder = Encoder.load(cfg, describe(cfg))
    want = expected_rewards(ckpt, trajectories(), encoder)
    assert_rewards_close([line["rewards"] for line in scored[1]], want)


def test_missing_module_is_null_and_duplicates_score_the_same(scored):
    lines = {line["id"]: line["rewards"] for line in scored[1]}
    no_memory = lines["no-memory"]
    assert no_memory["memory"] is None
    assert all(isinstance(no_memory[m], float) for m in ("reflection", "planner", "executor"))
    assert all(v is not None for k, r in lines.items() if k != "no-memory" for v in r.values())
    original = trajectories()[1]["id"]
    assert lines["duplicate"] == lines[original]
    # the context changes with the memory tags, so every other module's reward changes too
    first = trajectories()[0]["id"]
    assert no_memory["planner"] != lines[first]["planner"]


GOOD = '{"id": "a", "task": "t", "trajectory": "<plan>x</plan>"}\n'


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (GOOD + '{"id": "b", "task": "t"}\n', "record 1, field 'trajectory'"),
        ('{"id": "a", "task": "t", "trajectory": 3}\n', "record 0, field 'trajectory'"),
        (GOOD + '{"id": "b", "task": \n', r"record 1 \(line 2\): malformed JSON"),
        ("\n", "holds no records"),
    ],
    ids=["missing-field", "not-a-string", "malformed-json", "empty"],
)
def test_bad_input_names_file_record_and_field_and_writes_nothing(stage0, tmp_path, content, pattern):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "rewards.jsonl"
    out.write_text("previous results\n")
    with pytest.raises(ModrmError, match=re.escape(str(bad)) + ": " + pattern):
        score_file(stage0, bad, out, progress=False)
    assert out.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "rewards.jsonl"]


@pytest.mark.slow
def test_cli_scores_and_reports_bad_input_in_one_line(stage0, inputs, scored, tmp_path):
    out = tmp_path / "rewards.jsonl"
    code, stdout, stderr = modrm("score", "--checkpoint", stage0, "--input", inputs, "--out", out, "--quiet")
    assert code == 0, stderr
    assert f"scored {len(trajectories())} trajectories" in stdout
    assert_rewards_close([line["rewards"] for line in read_jsonl(out)], [line["rewards"] for line in scored[1]])

    before = out.read_text()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "task": "t"}])
    code, stdout, stderr = modrm("score", "--checkpoint", stage0, "--input", bad, "--out", out, "--quiet")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert str(bad) in stderr and "record 0" in stderr and "trajectory" in stderr
    assert out.read_text() == before


@pytest.mark.slow
def test_stage1_checkpoint_scores_with_its_fine_tuned_encoder(stage0, inputs, scored, tmp_path):
    stage1 = tmp_path / "stage1"
    settings = {"epochs": 1, "token_budget": 4096, "encoder_lr": 1e-3}
    finetune(stage0, [SEED_PAIRS], stage1, {"finetune": settings}, progress=False)
    out = tmp_path / "rewards.jsonl"
    score_file(stage1, inputs, out, progress=False)
    got = [line["rewards"] for line in read_jsonl(out)]

    ckpt = load_checkpoint(stage1)
    assert ckpt.stage == 1 and ckpt.encoder_folder is not None
    cfg = dataclasses.replace(ckpt.config.encoder, device="cpu")
    tuned = Encoder.load(cfg, describe(cfg, folder=ckpt.encoder_folder))
    assert_rewards_close(got, expected_rewards(ckpt, trajectories(), tuned))

    base = Encoder.load(cfg, describe(cfg))  # the stage-0 encoder under the stage-1 heads: not what score uses
    stale = expected_rewards(ckpt, trajectories(), base)
    diffs = [abs(g[m] - s[m]) for g, s in zip(got, stale, strict=True) for m in MODULES if g[m] is not None]
    assert max(diffs) > 1e-3


def test_parser_warnings_reach_the_output(stage0, tmp_path):
    records = [
        {"id": "clean", "task": "t", "trajectory": "Round 1:\n<plan> read the logs </plan>"},
        {"id": "unclosed", "task": "t", "trajectory": "Round 1:\n<plan> read the logs\nRound 2:\n<plan> fix </plan>"},
    ]
    out = tmp_path / "rewards.jsonl"
    score_file(stage0, write_jsonl(tmp_path / "in.jsonl", records), out, progress=False)
    lines = {line["id"]: line for line in read_jsonl(out)}
    assert "warnings" not in lines["clean"]
    assert lines["unclosed"]["warnings"] == [
        "round 1: <plan> is not closed; took its text up to the next 'Round N:' line"
    ]
