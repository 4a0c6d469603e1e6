"""Stage-1 (end-to-end fine-tuning) step time and memory per pair, by context length, with and without
gradient checkpointing.

Stage 1 back-propagates through the encoder, so its cost grows with the context length; this measures
what a step costs, to choose `finetune.token_budget` and gradient checkpointing. A step is what
`modrm finetune` does per batch: `EndToEnd` forward over B pairs (4 texts each: 2 contexts of the target
length, 2 module texts of 64 tokens), the preference loss, backward, gradient clipping and AdamW (fp32 on
CPU), through the real MiniLM and fresh reward heads.

Token batches are built directly with the encoder's tokenizer at exactly the target length: each text's
tokens (repeated if it is shorter) are cut to the length, contexts keeping their end as modrm's
truncation does, and wrapped in the model's special tokens. modrm itself never feeds MiniLM more than 256
tokens (its sentence-transformers max_seq_length, which the fingerprint respects); building the batch
directly is what lets 512 be measured, up to MiniLM's 512 positions.

Memory: each configuration runs in a fresh subprocess, and reports `ru_maxrss` (peak RSS) minus the RSS
after the model was loaded and the batch built, per pair. That difference has a fixed part, the gradient
buffers and AdamW moments of encoder and heads (allocated before the step and shown on their own), and a
part that grows with the batch (activations): the "MB/pair" column is that part, divided by B.

Contexts of 2048 tokens need a long-context encoder (Qwen3-Embedding) and a GPU. With CUDA, the
real-size Qwen3-Embedding-0.6B architecture (random weights, fp32 master weights, bf16 autocast) runs at
512 and 2048 tokens, with and without checkpointing, reporting pairs/s and torch.cuda.max_memory_allocated().
Without CUDA that part is skipped, and says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import build_random_qwen3, table, use_all_cores, warn_if_busy, write_results

from pipeline.config import Config, EncoderConfig
from pipeline.data import DEFAULT_MODULES
from pipeline.encoder import MINILM_ID, Encoder, Tokenized
from pipeline.finetune import EndToEnd, TokenizedPairs, enable_checkpointing, freeze_layers
from pipeline.heads import RewardHeads, preference_loss
from pipeline.synth import generate_pairs
from pipeline.training import Optimization, param_groups

MODULE_TOKENS = 64
CPU_LENGTHS = (128, 256, 512)
GPU_LENGTHS = (512, 2048)


def fixed_tokens(encoder: Encoder, texts: list[str], length: int, keep_end: bool) -> Tokenized:
    """Every text as exactly `length` tokens, special tokens included."""
    room = length - len(encoder.prefix) - len(encoder.suffix)
    ids = []
    for body in encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]:
        body = body * (room // max(1, len(body)) + 1)
        body = body[len(body) - room :] if keep_end else body[:room]
        ids.append(encoder.prefix + body + encoder.suffix)
    return Tokenized(ids, np.full(len(ids), length), np.zeros(len(ids), dtype=bool))


def fixed_pairs(encoder: Encoder, n_pairs: int, length: int) -> TokenizedPairs:
    pairs = generate_pairs(n_pairs // len(DEFAULT_MODULES) + 1, seed=0)[:n_pairs]
    columns = list(zip(*(Config().encoder.pair_texts(p) for p in pairs), strict=True))
    contexts = fixed_tokens(encoder, list(columns[0] + columns[2]), length, keep_end=True)
    modules = fixed_tokens(encoder, list(columns[1] + columns[3]), MODULE_TOKENS, keep_end=False)
    i = np.arange(n_pairs)
    rows = np.stack([i, i, n_pairs + i, n_pairs + i], axis=1)
    module_idx = np.array([DEFAULT_MODULES.index(p.target_module) for p in pairs])
    return TokenizedPairs(contexts, modules, rows, module_idx)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kb / 1024


def worker(args) -> dict:
    """One configuration in this (fresh) process: load, allocate, one warm-up step, `steps` timed steps."""
    use_all_cores()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    encoder = Encoder.load(
        EncoderConfig(name=args.encoder, device=args.device, dtype=args.weights_dtype, packing=args.packing)
    )
    cfg = Config()
    model = EndToEnd(encoder, RewardHeads(DEFAULT_MODULES, encoder.dim, cfg.heads).to(device))
    if args.train_layers is not None:
        freeze_layers(encoder.model, args.train_layers)
    if args.checkpointing:
        enable_checkpointing(encoder.model)
    data = fixed_pairs(encoder, args.pairs, args.length)
    rss_load = rss_mb()
    fc = cfg.finetune  # the optimizer `modrm finetune` builds (BF16AdamW for bf16 weights)
    groups = param_groups([(encoder.parameters(), fc.encoder_lr), (model.heads.parameters(), fc.heads_lr)], 0.01)
    dtype = "bfloat16" if args.autocast == "bf16" else "float32"
    opt = Optimization(groups, args.steps + 2, device, dtype, fc.betas, 0.0, fc.max_grad_norm)
    for p in opt.params:  # the fixed part: gradient buffers and AdamW moments, allocated before any step
        p.grad = torch.zeros_like(p)
    opt.optimizer.step()
    opt.optimizer.zero_grad(set_to_none=False)
    rss_fixed, gpu_fixed = rss_mb(), torch.cuda.memory_allocated() if cuda else 0
    index = np.arange(args.pairs)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        with opt.autocast():
            r_pos, r_neg, module_idx = model(data, index)
            loss = preference_loss(r_pos, r_neg, module_idx, len(DEFAULT_MODULES), cfg.heads.alpha, cfg.heads.margin)
        opt.backward(loss)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    try:
        step()
        seconds = statistics.median(step() for _ in range(args.steps))
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    result = {
        "seconds_per_step": seconds,
        "pairs_per_s": args.pairs / seconds,
        "rss_after_load_mb": rss_load,
        "peak_over_load_mb": peak - rss_load,
        "fixed_mb": rss_fixed - rss_load,
        "mb_per_pair": (peak - rss_fixed) / args.pairs,
    }
    if cuda:
        gpu_peak = torch.cuda.max_memory_allocated()
        result["max_memory_allocated_gib"] = gpu_peak / 2**30
        result["gpu_mb_per_pair"] = (gpu_peak - gpu_fixed) / 2**20 / args.pairs
    return result


def run_config(
    encoder: str,
    device: str,
    length: int,
    checkpointing: bool,
    pairs: int,
    steps: int,
    autocast: str,
    train_layers: int | None = None,
    weights_dtype: str = "float32",
    packing: str = "auto",
):
    """`worker` in a fresh interpreter, so ru_maxrss is this configuration's peak alone."""
    command = [sys.executable, __file__, "--worker", "--encoder", encoder, "--device", device]
    command += ["--length", str(length), "--pairs", str(pairs), "--steps", str(steps), "--autocast", autocast]
    command += ["--weights-dtype", weights_dtype, "--packing", packing]
    command += ["--checkpointing"] if checkpointing else []
    command += ["--train-layers", str(train_layers)] if train_layers is not None else []
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"worker failed ({' '.join(command[1:])}):\n{done.stderr[-3000:]}")
    config = {"length": length, "checkpointing": checkpointing, "pairs": pairs, "train_layers": train_layers}
    config |= {"weights_dtype": weights_dtype, "packing": packing}
    return config | json.loads(lines[-1].removeprefix("RESULT "))


CPU_COLUMNS = ("seconds_per_step", "pairs_per_s", "peak_over_load_mb", "fixed_mb", "mb_per_pair")
GPU_COLUMNS = ("seconds_per_step", "pairs_per_s", "max_memory_allocated_gib", "gpu_mb_per_pair")


def config_cells(result: dict) -> list:
    return [result["length"], "on" if result["checkpointing"] else "off"]


def kv_cache_bytes(length: int = 256) -> dict:
    """What the KV cache that transformers builds by default (use_cache=True) holds for the 0.6B Qwen3, per
    token, measured on a forward over one text; modrm's encoder asks for none (use_cache=False)."""
    from transformers import Qwen3Model

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_random_qwen3(Path(tmp) / "qwen3-0.6b", size="0.6b")
        model = Qwen3Model.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, length))
    with torch.inference_mode():
        cached = model(input_ids=ids, use_cache=True).past_key_values
        uncached = model(input_ids=ids, use_cache=False).past_key_values
    tensors = [t for layer in cached.layers for t in (layer.keys, layer.values)]
    per_token_fp32 = sum(t.numel() * t.element_size() for t in tensors) / length
    return {
        "bytes_per_token_fp32": per_token_fp32,
        "cache_without_use_cache": uncached is not None,
        "cuda_batch_32768_fp16_gib": per_token_fp32 / 2 * 32768 / 2**30,
        "cpu_batch_4096_fp32_gib": per_token_fp32 * 4096 / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step on CPU")
    parser.add_argument("--gpu-pairs", type=int, default=8, help="pairs per step on the GPU")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (median)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(CPU_LENGTHS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--encoder", default=MINILM_ID, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--autocast", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--train-layers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--packing", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return

    started = time.perf_counter()
    cores = use_all_cores()
    busy = warn_if_busy()
    print(f"bench_finetune: MiniLM on CPU, {cores} threads, {args.pairs} pairs per step")
    cpu = [
        run_config(MINILM_ID, "cpu", length, ckpt, args.pairs, args.steps, "none")
        for length in args.lengths
        for ckpt in (False, True)
    ]
    gpu = None
    if torch.cuda.is_available():
        with tempfile.TemporaryDirectory() as tmp:
            folder = str(build_random_qwen3(Path(tmp) / "qwen3-0.6b", size="0.6b"))
            gpu = [
                run_config(folder, "cuda", length, ckpt, args.gpu_pairs, args.steps, "bf16")
                for length in GPU_LENGTHS
                for ckpt in (False, True)
            ]

    print(f"\nStage-1 step (forward + backward + AdamW), MiniLM fp32, CPU, {args.pairs} pairs = 4 texts each:")
    print(
        table(
            ["context tokens", "checkpointing", "s/step", "pairs/s", "peak-load MB", "fixed MB", "MB/pair"],
            [[*config_cells(r), *(r[k] for k in CPU_COLUMNS)] for r in cpu],
        )
    )
    print(
        f"(module texts {MODULE_TOKENS} tokens; fixed = gradient buffers + AdamW moments of encoder and heads; "
        "MB/pair = (peak - load - fixed) / pairs)"
    )
    if gpu is None:
        print(
            "\n2048-token contexts need a long-context encoder (Qwen3-Embedding) and a GPU: "
            "no CUDA here, so the Qwen3-0.6B part was skipped."
        )
    else:
        print(f"\nQwen3-Embedding-0.6B architecture, random weights, bf16 autocast, CUDA, {args.gpu_pairs} pairs:")
        print(
            table(
                ["context tokens", "checkpointing", "s/step", "pairs/s", "peak GPU GiB", "GPU MB/pair"],
                [
                    [*config_cells(r), *(["out of memory"] if r.get("oom") else (r[k] for k in GPU_COLUMNS))]
                    for r in gpu
                ],
            )
        )
    kv = kv_cache_bytes()
    per_token = kv["bytes_per_token_fp32"] / 1024
    print(
        f"\nKV cache of the 0.6B Qwen3 with transformers' default use_cache=True: {per_token:.0f} KiB per token (fp32)"
    )
    print(
        f"= {kv['cuda_batch_32768_fp16_gib']:.2f} GiB for a 32,768-token fp16 batch (the CUDA default), "
        f"{kv['cpu_batch_4096_fp32_gib']:.2f} GiB for 4,096 tokens in fp32 (CPU); modrm passes use_cache=False"
    )
    write_results("bench_finetune", {"cpu_minilm": cpu, "cuda_qwen3": gpu, "kv_cache": kv}, started, busy)


if __name__ == "__main__":
    main()
