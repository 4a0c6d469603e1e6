"""Padding-free batches: the texts of a batch packed end to end into one sequence, attention kept inside each text.

A padded batch computes every layer on its pad tokens, and on real data, where lengths vary, that is much of the
work. Packed, the projections and MLPs see only real tokens. Attention needs the text boundaries
(`cu_seq_lens`, the cumulative lengths): on a GPU in fp16 or bf16 it runs FlashAttention's variable-length kernel
(`aten._flash_attention_forward`, the kernel behind torch's `varlen_attn`, with its backward for stage 1); in
fp32 and on the CPU, scaled_dot_product_attention text by text, which computes the same thing.

The attention is registered with transformers as `modrm_packed`, so any model whose attention goes through
transformers' attention interface (BERT, Qwen3, Llama and most others) packs; the rest stay padded.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION = "modrm_packed"
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    varlen_kernel: bool = False,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """Attention over texts packed into batch row 0: query (1, heads, tokens, head_dim), key and value with as many
    or fewer (grouped) heads. Returns (1, tokens, heads, head_dim), as transformers' other attentions do. The
    varlen kernel where the batch says the device has it and the dtype suits it; else sdpa text by text."""
    if cu_seq_lens_q is None:
        raise RuntimeError(f"attention {ATTENTION!r} needs cu_seq_lens_q: call the model with a packed batch")
    causal = bool(getattr(module, "is_causal", False))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, head_dim)
    if varlen_kernel and q.dtype in FLASH_DTYPES:
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, dropout, causal, False, scale=scaling
        )[0]
        return out.unsqueeze(0), None
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v)) if groups > 1 else (k, v)
    bounds = cu_seq_lens_q.tolist()
    pieces = [
        F.scaled_dot_product_attention(
            *(x[start:end].transpose(0, 1) for x in (q, k, v)), dropout_p=dropout, is_causal=causal, scale=scaling
        ).transpose(0, 1)
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(pieces).unsqueeze(0), None


@functools.cache
def has_varlen_kernel(device: torch.device) -> bool:
    """FlashAttention's kernels ship in torch's CUDA builds for Ampere (compute capability 8.0) and later. Decided
    once per device when a batch is packed, and passed down with it, so compiled attention never asks."""
    if device.type != "cuda" or not torch.backends.cuda.is_flash_attention_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def no_mask(*_: object, **__: object) -> None:
    """The boundaries travel as cu_seq_lens: no mask is built (a dense one would cost tokens² memory)."""
    return None


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, no_mask)


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether the model's attention goes through transformers' attention interface (so `modrm_packed` reaches it)."""
    return bool(getattr(model, "_supports_attention_backend", False))


def pack(ids: list[list[int]], device: torch.device) -> dict[str, torch.Tensor | int]:
    """One row of all texts end to end: input ids, positions restarting at each text, and the boundaries."""
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    total = int(cu[-1])
    starts = torch.repeat_interleave(cu[:-1].long(), lengths.long(), output_size=total)
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total))
    batch = {
        "input_ids": flat.unsqueeze(0),
        "position_ids": (torch.arange(total) - starts).unsqueeze(0),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
    }
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    longest = int(lengths.max())
    return batch | {"max_length_q": longest, "max_length_k": longest, "varlen_kernel": has_varlen_kernel(device)}


def pool_packed(hidden: torch.Tensor, cu: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool the token states of packed texts (hidden: (tokens, dim)) into one row per text."""
    if mode == "lasttoken":
        return hidden[cu[1:].long() - 1]
    if mode == "cls":
        return hidden[cu[:-1].long()]
    lengths = (cu[1:] - cu[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    index = segment.unsqueeze(1).expand_as(hidden)
    reduce = {"mean": "mean", "max": "amax"}[mode]
    out = hidden.new_zeros(len(lengths), hidden.shape[1])
    return out.scatter_reduce(0, index, hidden, reduce=reduce, include_self=False)
