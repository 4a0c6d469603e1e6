"""Stage 1 on a tiny random Qwen3: weights move, loss falls, checkpointing, freezing, resume."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from in_process import modrm
from safetensors.torch import load_file, save_file

import pipeline.finetune as ft
from pipeline.atomic import recover
from pipeline.checkpoint import load_checkpoint
from pipeline.encoder import Encoder, describe
from pipeline.errors import ModrmError
from pipeline.heads import preference_loss
from pipeline.training import warmup_then_linear

pytestmark = pytest.mark.slow  # training runs, subprocesses or many examples: `make test-fast` skips them

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"


def run(stage0: Path, out: Path, **overrides) -> dict:
    settings = {"epochs": 1, "token_budget": 4096, "save_every": 1, "encoder_lr": 1e-3, "heads_lr": 1e-3} | overrides
    return ft.finetune(stage0, [SEED_PAIRS], out, {"finetune": settings}, progress=False)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The best checkpoint's encoder and heads."""
    return load_file(str(folder / "encoder" / "model.safetensors")) | load_file(str(folder / "heads.safetensors"))


def latest(folder: Path) -> dict[str, torch.Tensor]:
    """The weights training ended with (the resume snapshot), whichever epoch was kept as best."""
    state = load_file(str(folder / ft.SNAPSHOT_DIR / "model.safetensors"))
    return {k.removeprefix("encoder.model.").removeprefix("heads."): v for k, v in state.items()}


def test_one_run_moves_encoder_and_heads(stage0, tmp_path):
    run(stage0, tmp_path)
    before = load_file(str(next((stage0.parent / "qwen").glob("*.safetensors")))) | load_file(
        str(stage0 / "heads.safetensors")
    )
    after = latest(tmp_path)
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert any(k.startswith("layers.") for k in changed)
    assert any(k.startswith("heads.") for k in changed)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.stage == 1 and ckpt.encoder_folder is not None
    assert ckpt.fingerprint.weights_sha256 != load_checkpoint(stage0).fingerprint.weights_sha256


def _setup(stage0: Path, checkpointing: bool):
    ckpt = load_checkpoint(stage0)
    cfg = dataclasses.replace(ckpt.config.encoder, dtype="float32", device="cpu")
    encoder = Encoder.load(cfg, describe(cfg))
    if checkpointing:
        ft.enable_checkpointing(encoder.model)
    split = ft.load_split([SEED_PAIRS], ckpt)
    data = ft.tokenize_pairs(encoder, split["train"][:6], ckpt.model.module_names)
    model = ft.EndToEnd(encoder, ckpt.model).train()
    return model, data, ckpt


def test_gradient_checkpointing_gives_the_same_gradients(stage0):
    grads = []
    for checkpointing in (False, True):
        model, data, ckpt = _setup(stage0, checkpointing)
        r_pos, r_neg, idx = model(data, np.arange(6))
        preference_loss(r_pos, r_neg, idx, len(ckpt.model.module_names), 0.1, 0.1).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_finetune_lowers_the_training_loss_and_logs_every_step(stage0, tmp_path):
    result = run(stage0, tmp_path, epochs=2, warmup_ratio=0.25, heads_lr=3e-3, save_every=1000)
    steps = result["steps"]
    per_epoch = [np.mean([s["loss"] for s in steps if s["epoch"] == e]) for e in (1, 2)]
    assert per_epoch[1] < per_epoch[0]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    factor = warmup_then_linear(len(steps), 0.25)
    for i, s in enumerate(steps):  # the learning rate each step used (encoder group) follows the schedule
        assert s["lr"][0] == pytest.approx(1e-3 * factor(i))
    history = json.loads((tmp_path / "finetune_history.json").read_text())
    assert history["steps"] == steps and [e["epoch"] for e in history["epochs"]] == [0, 1, 2]


def test_max_steps_and_grad_accum_count_optimizer_steps(stage0, tmp_path):
    one = run(stage0, tmp_path / "a", epochs=2, save_every=1000)["steps"]
    two = run(stage0, tmp_path / "b", epochs=2, grad_accum=2, save_every=1000)["steps"]
    assert len(two) == sum(math.ceil(sum(1 for _ in g) / 2) for _, g in itertools.groupby(one, lambda s: s["epoch"]))
    assert sum(s["pairs"] for s in two) == sum(s["pairs"] for s in one)  # every pair, once an epoch
    capped = run(stage0, tmp_path / "c", epochs=3, max_steps=3, save_every=1000)
    assert len(capped["steps"]) == 3 and capped["history"][-1]["epoch"] == 1


def test_the_encoder_runs_without_a_kv_cache(stage0, monkeypatch):
    model, data, _ = _setup(stage0, False)
    seen = []
    forward = model.encoder.model.forward
    monkeypatch.setattr(
        model.encoder.model, "forward", lambda *a, **k: seen.append(k.get("use_cache")) or forward(*a, **k)
    )
    model(data, np.arange(2))
    assert seen and all(flag is False for flag in seen)


def test_encoder_dropout_setting_and_frozen_blocks_in_eval_mode(minilm_id, make_config):
    encoder = Encoder.load(make_config(minilm_id).encoder)
    batch = encoder.collate(encoder.tokenize(["read the logs", "fix the leak"], "module").ids)
    encoder.train()
    assert not torch.equal(encoder(batch), encoder(batch))  # MiniLM's own dropout, 0.1
    ft.set_encoder_dropout(encoder.model, 0.0)
    torch.testing.assert_close(encoder(batch), encoder(batch))
    ft.set_encoder_dropout(encoder.model, 0.3)
    ft.freeze_layers(encoder.model, 1)
    frozen = ft.frozen_blocks(encoder.model)
    layers = ft.encoder_layers(encoder.model)
    assert all(layer in frozen for layer in layers[:-1]) and layers[-1] not in frozen
    assert encoder.model.embeddings in frozen
    ft.train_mode(ft.EndToEnd(encoder, torch.nn.Linear(1, 1)), frozen)
    assert not encoder.model.embeddings.training and not layers[0].training and layers[-1].training


def test_lora_is_seeded_and_exclusive_with_train_layers(stage0, tmp_path):
    pytest.importorskip("peft")
    a, b = run(stage0, tmp_path / "a", lora_r=2, max_steps=1), run(stage0, tmp_path / "b", lora_r=2, max_steps=1)
    assert [s["loss"] for s in a["steps"]] == [s["loss"] for s in b["steps"]]
    for k, v in latest(tmp_path / "a").items():
        assert torch.equal(v, latest(tmp_path / "b")[k]), k
    with pytest.raises(ModrmError, match="--lora and --train-layers both choose"):
        run(stage0, tmp_path / "c", lora_r=2, train_layers=1)


def test_partial_freezing_leaves_frozen_layers_identical(stage0, tmp_path):
    run(stage0, tmp_path, train_layers=1)
    base = load_file(str(next((stage0.parent / "qwen").glob("*.safetensors"))))
    after = latest(tmp_path)
    frozen = [k for k in base if k.startswith(("layers.0.", "embed_tokens."))]
    trained = [k for k in base if k.startswith("layers.1.")]
    assert frozen and all(torch.equal(base[k], after[k]) for k in frozen)
    assert any(not torch.equal(base[k], after[k]) for k in trained)


PRECISIONS = {
    "float32": {},
    "float16": {"dtype": "float16", "epochs": 1, "max_steps": 4},
    "bf16 weights": {"weights_dtype": "bfloat16", "epochs": 1, "max_steps": 3},
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_resume_equals_an_uninterrupted_run(stage0, tmp_path, monkeypatch, precision):
    """With dropout on (encoder and heads), so a wrong RNG restore would show; in fp16 the grad scaler's state
    (its scale after the skipped steps) must come back too; with bf16 weights, BF16AdamW's bf16 moments and its
    rounding noise."""
    dropout = {"encoder_dropout": 0.2} | PRECISIONS[precision]
    heads = {"heads": {"dropout": 0.2}}

    def go(out: Path, resume: bool = False) -> dict:
        settings = {"epochs": 2, "token_budget": 4096, "save_every": 1, "encoder_lr": 1e-3, "heads_lr": 1e-3}
        return ft.finetune(stage0, [SEED_PAIRS], out, {"finetune": settings | dropout, **heads}, resume, progress=False)

    go(tmp_path / "full")
    real_save, calls = ft.save_snapshot, []

    def crash_after_two(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a kill looks like to the next run: a snapshot on disk, nothing else

    monkeypatch.setattr(ft, "save_snapshot", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "resumed")
    if precision == "float16":  # steps were skipped before the kill: the scale to restore is not the initial one
        assert (
            json.loads((tmp_path / "resumed" / ft.SNAPSHOT_DIR / "state.json").read_text())["scaler"]["scale"] < 2**16
        )
    monkeypatch.setattr(ft, "save_snapshot", real_save)
    go(tmp_path / "resumed", resume=True)
    for read in (weights, latest):
        full, resumed = read(tmp_path / "full"), read(tmp_path / "resumed")
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), k
    scalers = [
        json.loads((tmp_path / d / ft.SNAPSHOT_DIR / "state.json").read_text())["scaler"] for d in ("full", "resumed")
    ]
    assert scalers[0] == scalers[1]  # fp16: the same scale and growth count at the end
    snapshot = load_file(str(tmp_path / "full" / ft.SNAPSHOT_DIR / "model.safetensors"))
    encoder_dtypes = {v.dtype for k, v in snapshot.items() if k.startswith("encoder.")}
    assert encoder_dtypes == {torch.bfloat16 if precision == "bf16 weights" else torch.float32}


@pytest.mark.parametrize("crash_at", [1, 4, 9, 14, 22, 31])
def test_a_kill_at_any_save_leaves_a_loadable_checkpoint_and_snapshot(stage0, tmp_path, monkeypatch, crash_at):
    """Every file operation of every save is a point where the process may die; after any of them the
    checkpoint loads, and --resume finishes the run."""
    import pipeline.atomic as atomic

    calls = []
    real_replace = os.replace

    def replace(*args):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return real_replace(*args)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        run(stage0, tmp_path, epochs=2, save_every=2)
    monkeypatch.undo()
    recover(tmp_path)  # what the next run or reader does first
    if not (tmp_path / "config.json").exists():  # killed before the first checkpoint was committed: nothing half there
        assert not any((tmp_path / name).exists() for name in ("encoder", "heads.safetensors", "metrics.json"))
        return
    load_checkpoint(tmp_path)  # the old checkpoint or the new one
    if (tmp_path / ft.SNAPSHOT_DIR).is_dir():
        settings = {"epochs": 2, "token_budget": 4096, "save_every": 2, "encoder_lr": 1e-3, "heads_lr": 1e-3}
        ft.finetune(stage0, [SEED_PAIRS], tmp_path, {"finetune": settings}, resume=True, progress=False)
        assert load_checkpoint(tmp_path).stage == 1


def test_bad_input_is_a_clear_error(stage0, tmp_path):
    with pytest.raises(ModrmError, match="below the longest pair"):
        run(stage0, tmp_path / "a", token_budget=64)
    odd = tmp_path / "odd.json"
    odd.write_text(SEED_PAIRS.read_text().replace('"target_module": "planner"', '"target_module": "critic"'))
    with pytest.raises(ModrmError, match="module 'critic' has no head"):
        ft.finetune(stage0, [odd], tmp_path / "b", {}, progress=False)
    with pytest.raises(ModrmError, match="nothing to resume"):
        ft.finetune(stage0, [SEED_PAIRS], tmp_path / "c", {}, resume=True, progress=False)
    wrong = tmp_path / "wrong"
    shutil.copytree(stage0, wrong)
    text = (wrong / "config.json").read_text().replace('"pooling": "lasttoken"', '"pooling": "mean"')
    (wrong / "config.json").write_text(text)
    with pytest.raises(ModrmError, match="is not the one its heads were trained on"):
        run(wrong, tmp_path / "d")


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 8 GB"),
    ],
)
def test_running_out_of_memory_says_what_to_change(stage0, tmp_path, monkeypatch, error):
    def raising(err: BaseException):
        def forward(*args, **kwargs):
            raise err

        return forward

    monkeypatch.setattr(ft.EndToEnd, "forward", raising(error))
    with pytest.raises(ModrmError, match=r"out of CPU memory at finetune\.token_budget 4096: lower --token-budget"):
        run(stage0, tmp_path)
    monkeypatch.setattr(ft.EndToEnd, "forward", raising(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is not dressed up as memory
        run(stage0, tmp_path / "b")


def test_lora_trains_adapters_and_saves_a_merged_encoder(stage0, tmp_path):
    pytest.importorskip("peft")
    run(stage0, tmp_path, lora_r=4)
    base = load_file(str(next((stage0.parent / "qwen").glob("*.safetensors"))))
    after = load_file(str(tmp_path / "encoder" / "model.safetensors"))
    assert after.keys() == base.keys()  # merged back: a plain encoder, loadable without peft
    assert any(not torch.equal(base[k], after[k]) for k in base if k.startswith("layers."))
    assert all(torch.equal(base[k], after[k]) for k in base if k.startswith("embed_tokens."))


def test_partial_freezing_on_bert_freezes_the_whole_embedding_block(minilm_id, make_config):
    encoder = Encoder.load(make_config(minilm_id).encoder)
    ft.freeze_layers(encoder.model, 1)
    trainable = [n for n, p in encoder.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("encoder.layer.5.", "pooler.")) for n in trainable), trainable


# ---------------------------------------------------------------------------------------------- --out and --resume


def test_a_new_run_replaces_an_older_checkpoints_files_and_never_resumes_its_snapshot(stage0, tmp_path, monkeypatch):
    """Issue 27: a fresh run into an --out holding another run's files (an eval cache of the older encoder, a
    snapshot, logs), killed right after its first save: nothing of the older run is left, so --resume refuses."""
    out = tmp_path / "out"
    run(stage0, out, max_steps=1)
    (out / "cache").mkdir()
    (out / "cache" / "manifest.json").write_text("{}")  # what `modrm eval` of that checkpoint leaves
    (out / "metrics.jsonl").write_text("")
    assert (out / ft.SNAPSHOT_DIR).is_dir()
    real_save = ft.save_stage1

    def killed_after_first_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_stage1", killed_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        run(stage0, out, max_steps=1, seed=1)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "encoder", "heads.safetensors", "metrics.json"]
    assert load_checkpoint(out).config.finetune.seed == 1
    with pytest.raises(ModrmError, match="nothing to resume"):
        ft.finetune(stage0, [SEED_PAIRS], out, {"finetune": {"seed": 1}}, resume=True, progress=False)


def test_an_out_folder_of_other_files_is_refused_untouched(stage0, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModrmError, match="holds files but no modrm checkpoint"):
        run(stage0, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def snapshot_run(stage0, tmp_path_factory) -> ft.Run:
    """A finished short run's folder, and the run `--resume` would continue there (set up once)."""
    out = tmp_path_factory.mktemp("snapshot")
    settings = {"epochs": 1, "max_steps": 2, "token_budget": 4096, "save_every": 1}
    ft.finetune(stage0, [SEED_PAIRS], out, {"finetune": settings}, progress=False)
    return ft.setup(stage0, [SEED_PAIRS], out, {"finetune": settings}, resume=True)


def test_resume_refuses_another_runs_snapshot(stage0, snapshot_run):
    settings = {"epochs": 1, "max_steps": 2, "token_budget": 4096, "save_every": 1, "heads_lr": 1e-2}
    with pytest.raises(ModrmError, match=r"state\.json: the snapshot of another run \(config\.finetune\.heads_lr"):
        ft.finetune(stage0, [SEED_PAIRS], snapshot_run.out, {"finetune": settings}, resume=True, progress=False)


def _json_edit(edit):
    def damage(folder: Path) -> None:
        path = folder / "state.json"
        state = json.loads(path.read_text())
        edit(state)
        path.write_text(json.dumps(state))

    return damage


def _tensor_edit(name: str, edit):
    def damage(folder: Path) -> None:
        tensors = load_file(str(folder / name))
        edit(tensors)
        save_file(tensors, str(folder / name))

    return damage


def _truncate(name: str):
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return damage


def _first(tensors: dict, suffix: str = "") -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


DAMAGE = {
    "state not JSON": ("state.json", _truncate("state.json")),
    "state a list": ("state.json", lambda f: (f / "state.json").write_text("[]")),
    "history a string": ("state.json", _json_edit(lambda s: s.update(history="x"))),
    "steps missing": ("state.json", _json_edit(lambda s: s.pop("steps"))),
    "a step renumbered": ("state.json", _json_edit(lambda s: s["steps"][0].update(step=7))),
    "a val loss not a number": ("state.json", _json_edit(lambda s: s["history"][0].update(val_loss="low"))),
    "a step too many": ("state.json", _json_edit(lambda s: s["steps"].append(s["steps"][-1] | {"step": 3}))),
    "run missing": ("state.json", _json_edit(lambda s: s.pop("run"))),
    "model truncated": ("model.safetensors", _truncate("model.safetensors")),
    "model missing": ("model.safetensors", lambda f: (f / "model.safetensors").unlink()),
    "a weight reshaped": (
        "model.safetensors",
        _tensor_edit("model.safetensors", lambda t: t.update({_first(t): t[_first(t)].flatten()[:3].clone()})),
    ),
    "a weight dropped": ("model.safetensors", _tensor_edit("model.safetensors", lambda t: t.pop(_first(t)))),
    "optimizer truncated": ("optimizer.safetensors", _truncate("optimizer.safetensors")),
    "a moment reshaped": (
        "optimizer.safetensors",
        _tensor_edit("optimizer.safetensors", lambda t: t.update({_first(t, "exp_avg"): torch.zeros(2)})),
    ),
    "a moment dropped": (
        "optimizer.safetensors",
        _tensor_edit("optimizer.safetensors", lambda t: t.pop(_first(t, "exp_avg_sq"))),
    ),
    "a parameter unknown": (
        "optimizer.safetensors",
        _tensor_edit("optimizer.safetensors", lambda t: t.update({"999999.step": torch.tensor(1.0)})),
    ),
    "rng not a generator state": ("rng.safetensors", _tensor_edit("rng.safetensors", lambda t: t["torch_rng"].zero_())),
    "rng truncated": ("rng.safetensors", _truncate("rng.safetensors")),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_snapshot_is_one_error_naming_its_file(snapshot_run, tmp_path, case):
    name, damage = DAMAGE[case]
    shutil.copytree(snapshot_run.out / ft.SNAPSHOT_DIR, tmp_path / ft.SNAPSHOT_DIR)
    damage(tmp_path / ft.SNAPSHOT_DIR)
    before = {k: v.clone() for k, v in snapshot_run.model.state_dict().items()}
    with pytest.raises(ModrmError, match=rf"{ft.SNAPSHOT_DIR}/{re.escape(name)}: "):
        ft.load_snapshot(dataclasses.replace(snapshot_run, out=tmp_path))
    after = snapshot_run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing restored from a damaged snapshot


def test_a_damaged_snapshot_on_the_command_line_is_one_line(stage0, snapshot_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(snapshot_run.out, out)
    _truncate("state.json")(out / ft.SNAPSHOT_DIR)
    args = ["finetune", "--checkpoint", stage0, "--data", SEED_PAIRS, "--out", out, "--resume", "--max-steps", "2"]
    code, _, stderr = modrm(*args)
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and "resume/state.json: a damaged snapshot" in stderr
