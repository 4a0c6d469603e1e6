"""Stage 1 on a tiny random Qwen3: weights move, loss falls, checkpointing, freezing, resume."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pipeline.finetune as ft
from pipeline.checkpoint import load_checkpoint
from pipeline.encoder import Encoder, describe
from pipeline.errors import ModrmError
from pipeline.heads import preference_loss

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


def test_loss_decreases_over_a_few_steps(stage0):
    model, data, ckpt = _setup(stage0, False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        r_pos, r_neg, idx = model(data, np.arange(6))
        loss = preference_loss(r_pos, r_neg, idx, len(ckpt.model.module_names), 0.1, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_partial_freezing_leaves_frozen_layers_identical(stage0, tmp_path):
    run(stage0, tmp_path, train_layers=1)
    base = load_file(str(next((stage0.parent / "qwen").glob("*.safetensors"))))
    after = latest(tmp_path)
    frozen = [k for k in base if k.startswith(("layers.0.", "embed_tokens."))]
    trained = [k for k in base if k.startswith("layers.1.")]
    assert frozen and all(torch.equal(base[k], after[k]) for k in frozen)
    assert any(not torch.equal(base[k], after[k]) for k in trained)


def test_resume_equals_an_uninterrupted_run(stage0, tmp_path, monkeypatch):
    run(stage0, tmp_path / "full", epochs=2)
    real_save, calls = ft.save_snapshot, []

    def crash_after_two(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a kill looks like to the next run: a snapshot on disk, nothing else

    monkeypatch.setattr(ft, "save_snapshot", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(stage0, tmp_path / "resumed", epochs=2)
    monkeypatch.setattr(ft, "save_snapshot", real_save)
    ft.finetune(
        stage0,
        [SEED_PAIRS],
        tmp_path / "resumed",
        {"finetune": {"epochs": 2, "token_budget": 4096, "save_every": 1, "encoder_lr": 1e-3, "heads_lr": 1e-3}},
        resume=True,
        progress=False,
    )
    for read in (weights, latest):
        full, resumed = read(tmp_path / "full"), read(tmp_path / "resumed")
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), k


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
