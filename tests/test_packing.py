"""Packed batches (`encoder.packing`): the texts of a batch end to end, no padding, give what padded batches give,
forward and backward, for a bidirectional encoder with mean pooling (MiniLM) and a causal one with grouped
key/value heads and last-token pooling (Qwen3). On the CPU the attention runs text by text; the cuda tests do the
same comparisons through FlashAttention's varlen kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.encoder import Encoder, pool
from pipeline.packing import pack, pool_packed

TEXTS = [f"round {n}: " + "read the logs, then fix the leak " * n for n in (0, 9, 2, 30, 1, 5, 17, 3)]


@pytest.fixture(scope="module", params=["minilm", "qwen3"])
def encoders(request, tiny_qwen3: Path, minilm_id: str, make_config) -> tuple[Encoder, Encoder]:
    """(packed, padded) encoders of one model, in fp32 on the CPU."""
    name = minilm_id if request.param == "minilm" else tiny_qwen3
    limits = {"max_context_tokens": 128, "max_module_tokens": 128, "token_budget": 512}
    packed, padded = (Encoder.load(make_config(name, packing=p, **limits).encoder) for p in ("on", "off"))
    assert packed.packed and not padded.packed
    return packed, padded


def test_packed_embeddings_equal_padded(encoders: tuple[Encoder, Encoder]) -> None:
    packed, padded = encoders
    for role in ("context", "module"):
        np.testing.assert_allclose(packed.encode(TEXTS, role), padded.encode(TEXTS, role), atol=2e-6)


def test_a_packed_batch_is_one_row_with_positions_restarting_at_each_text(encoders: tuple[Encoder, Encoder]) -> None:
    packed, _ = encoders
    ids = packed.tokenize(TEXTS[:3], "module").ids
    batch = packed.collate(ids)
    lengths = [len(x) for x in ids]
    assert batch["input_ids"].tolist() == [[t for x in ids for t in x]]
    assert batch["position_ids"].tolist() == [[p for n in lengths for p in range(n)]]
    assert batch["cu_seq_lens_q"].tolist() == np.cumsum([0, *lengths]).tolist()
    assert batch["max_length_q"] == max(lengths)


def test_packed_gradients_equal_padded(encoders: tuple[Encoder, Encoder]) -> None:
    """Stage 1 trains through the same batches: the encoder's gradients agree (dropout off)."""
    grads = []
    torch.manual_seed(0)
    weights = torch.randn(len(TEXTS), encoders[0].dim)
    for encoder in encoders:
        encoder.zero_grad()
        loss = (encoder(encoder.collate(encoder.tokenize(TEXTS, "context").ids)) * weights).sum()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["mean", "max", "cls", "lasttoken"])
def test_packed_pooling_equals_padded_pooling(mode: str) -> None:
    lengths = [3, 1, 5]
    torch.manual_seed(0)
    texts = [torch.randn(n, 4) for n in lengths]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    padded = torch.stack([torch.cat([t, torch.full((5 - len(t), 4), 7.0)]) for t in texts])
    cu = torch.tensor(np.cumsum([0, *lengths]))
    torch.testing.assert_close(pool_packed(torch.cat(texts), cu, mode), pool(padded, mask, mode))


def test_pack_takes_no_padding() -> None:
    batch = pack([[5, 6, 7], [8]], torch.device("cpu"))
    assert batch["input_ids"].shape == (1, 4) and "attention_mask" not in batch
