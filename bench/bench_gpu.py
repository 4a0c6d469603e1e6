"""The GPU path, measured on one GPU (`make bench-gpu`): the cuda tests, fp16 Qwen3 embedding (padded, packed,
compiled) against sentence-transformers and the card's matmul ceiling, stage 0 against its matmul ceiling, stage 1
with fp32 and with bf16 weights, and `modrm serve` under 1, 8 and 32 clients with the LRU off and on.

Nothing is downloaded: the encoder is a Qwen3 embedding model at the real 0.6B size with random weights, built
on the fly (honest for speed and memory, meaningless for quality). Sections run in order; one that fails is
recorded with its error and the rest still run. Results are written after every section to
OUT/bench_gpu.json (default artifacts/bench), so a run cut short keeps what it measured; the table is printed
last. The default sections (DEFAULT_SECTIONS) are sized for one call of about 8 minutes; `--only all` runs all.

    embedding   texts of exactly 512 and 2048 tokens, and of 64 to 2048 (as many as --seconds of packed embedding
                takes, at most 20,000), fp16: modrm's Encoder.encode padded (encoder.packing = off), packed (the
                default on a GPU) and packed under `Encoder.compile`, and SentenceTransformer.encode(batch_size=32),
                all end to end (tokenization included) on the same texts; tokens/s, peak GPU memory, MFU = model
                FLOPs/s over the card's measured fp16 matmul rate; cosine to an fp32 padded reference on a subset
    stage 0     train_heads on CUDA, 1M pairs of dim 1024 (rows drawn from 262,144 cached vectors), batch 256
                (the default) and 4096, against bare Linear layers of the heads' shapes on the same card
    stage 1     forward + backward + optimizer step of the 0.6B encoder and heads, every layer trained, gradient
                checkpointing on, bf16 autocast, 4 pairs per step, 2048-token contexts: fp32 weights padded (the
                last release), fp32 weights packed, bf16 weights (BF16AdamW) packed
    serve       bench_serve.py on the GPU: `modrm serve` (compiled, its default there) with the 0.6B encoder under
                1, 8 and 32 clients, the LRU off and on, and batches of one under 32; each row on fresh
                trajectories, with the tokens the server encoded (its batch log); the servers' logs are kept

With --only:
    fallback    the same model with one token planted to overflow fp16 (tests/random_qwen3.py): 1 text in
                16 carries it; overflowed texts re-encoded in fp32, counted and timed against the clean set
    portability synth -> embed -> train-heads -> finetune on the GPU with a tiny Qwen3, then `modrm eval` of
                both checkpoints in a process that sees no GPU, against the same eval on the GPU
    serve_profile  where a served trajectory's time goes, in process: the steps of a lone one and of 32 (host
                time to issue a forward pass included), a torch profile of lone calls (profile_lone.txt),
                trajectories/s at several token budgets
    stage0_scale   train_heads on --scale-pairs pairs (10M) at batch 4096 in a process of its own: pairs/s, RSS
    serve_compile  `Encoder.compile` (what --compile runs) against eager in process: the compile, a lone
                trajectory, 256 at once
    serve_eager    the serve rows with --no-compile, micro-batches capped at 256 and 16, and batches of one
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, ROOT, build_random_qwen3, machine, table

from pipeline.config import Config, EncoderConfig
from pipeline.encoder import Encoder
from pipeline.synth import generate_pairs

LENGTHS = (512, 2048)
MAX_TEXTS = 20_000
TRIGGER = "~"
EMBED_HEADERS = ("texts (tokens)", "n", "way", "tok/s", "MFU", "vs ST", "peak GiB", "cosine to fp32 min")
STAGE1_KEYS = ("seconds_per_step", "pairs_per_s", "max_memory_allocated_gib", "gpu_mb_per_pair")
DEVICE = "cuda"  # --device cpu --size tiny: a dry run of every section on a machine without a GPU
# `make bench-gpu`: one call of about 8 minutes on a lent GPU; the other sections with --only
DEFAULT_SECTIONS = ("card", "cuda_tests", "build", "embedding", "stage0", "stage1", "serve")


# ---------------------------------------------------------------------------------------------- the card


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """The card's dense matmul rate on random data (median of `repeats`, after warm-up), in TFLOP/s."""
    a, b = torch.randn(n, n, device=DEVICE, dtype=dtype), torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def card() -> dict:
    if DEVICE != "cuda":
        return {"name": "cpu (dry run)", "matmul_fp16_tflops": matmul_tflops(torch.float32, 1024, 3)}
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": props.total_memory / 2**30,
        "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul_fp16_tflops": matmul_tflops(torch.float16),
        "matmul_bf16_tflops": matmul_tflops(torch.bfloat16),
    }


# ---------------------------------------------------------------------------------------------- embedding


def model_flops(config, lengths: np.ndarray) -> float:
    """Forward FLOPs of texts of these token lengths: 2 x the linear weights per token, plus QK^T and AV over each
    text's whole length (counted in full, as PaLM's MFU does)."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    linear = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    lengths = lengths.astype(np.float64)
    return config.num_hidden_layers * float((2 * linear * lengths + 4 * lengths**2 * q).sum())


def make_texts(encoder: Encoder, n: int, length: int, seed: int = 2, mixed: bool = False) -> list[str]:
    """`n` distinct texts of at least `length` tokens (cut to it by the encoder), not much longer, so
    tokenization costs what real texts of that length cost; `mixed`: lengths drawn uniformly from 64 to `length`
    tokens, as contexts of trajectories at different rounds are."""
    stream = "\n".join(p.positive.context for p in generate_pairs(200, seed=seed))
    sample = stream[:20_000]
    chars_per_token = len(sample) / len(encoder.tokenizer(sample, add_special_tokens=False)["input_ids"])
    width = int(length * chars_per_token * 1.2)
    stream = stream * (width // len(stream) + 2)
    step = max(1, (len(stream) - width) // max(1, n))
    widths = np.random.default_rng(seed).integers(int(64 * chars_per_token), width + 1, n) if mixed else [width] * n
    return [f"{i}: " + stream[(i * step) % (len(stream) - width) :][:w] for i, w in enumerate(widths)]


def timed_cuda(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(result, seconds, peak GPU GiB) of fn, the GPU waited for."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        return fn(), time.perf_counter() - start, float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def free_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


EMBED_SETS = (("512", 512, False), ("2048", 2048, False), ("mixed 64-2048", 2048, True))
# modrm's ways to embed: (encoder.packing, compiled); "packed" is `modrm embed`'s default on a GPU
EMBED_MODES = {"padded": ("off", False), "packed": ("on", False), "packed, compiled": ("on", True)}


def with_limit(encoder: Encoder, length: int) -> Encoder:
    """The encoder cutting contexts at `length` tokens, as one loaded with that limit would (the model is the same),
    so each way of embedding loads, and compiles, once for all the text sets."""
    encoder.fingerprint = dataclasses.replace(encoder.fingerprint, max_context_tokens=length)
    return encoder


def embedding(folder: Path, seconds: float, peak_tflops: float) -> dict:
    """Each text set through modrm's three ways and SentenceTransformer.encode(batch_size=32), end to end
    (tokenization included), the same texts; each way's fp16 embeddings against an fp32 padded reference."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig

    def load(packing: str, dtype: str = "auto") -> Encoder:
        config = EncoderConfig(name=str(folder), device=DEVICE, dtype=dtype, max_context_tokens=max(LENGTHS))
        return Encoder.load(dataclasses.replace(config, packing=packing))

    hf_config = AutoConfig.from_pretrained(folder)
    encoder, reference, sets = load("on"), load("off", "float32"), {}
    for label, length, mixed in EMBED_SETS:  # the texts: as many as `seconds` of packed embedding takes
        probe = make_texts(with_limit(encoder, length), 256, length, seed=1, mixed=mixed)
        encoder.encode(probe[:32], "context")  # warm-up
        _, probe_s, _ = timed_cuda(lambda e=encoder, p=probe: e.encode(p, "context"))
        texts = make_texts(encoder, int(min(MAX_TEXTS, len(probe) / probe_s * seconds)), length, mixed=mixed)
        subset = texts[:: max(1, len(texts) // (256 if length <= 512 else 64))]
        tokens = encoder.tokenize(texts, "context").lengths
        sets[label] = {
            "texts": texts,
            "length": length,
            "subset": subset,
            "reference": with_limit(reference, length).encode(subset, "context"),
            "tokens": tokens,
            "flops": model_flops(hf_config, tokens),
        }
    del encoder, reference
    free_memory()
    results = {
        label: {"texts": len(t["texts"]), "tokens": int(t["tokens"].sum()), "mean_tokens": float(t["tokens"].mean())}
        for label, t in sets.items()
    }
    for mode, (packing, compiled) in EMBED_MODES.items():
        encoder = load(packing)
        if compiled:
            _, compile_s, _ = timed_cuda(encoder.compile)
        for label, t in sets.items():
            with_limit(encoder, t["length"]).encode(t["texts"][:32], "context")
            _, s, gib = timed_cuda(lambda e=encoder, x=t["texts"]: e.encode(x, "context"))
            agreement = cosine(encoder.encode(t["subset"], "context"), t["reference"])
            results[label][mode] = {
                "seconds": s,
                "tokens_per_s": t["tokens"].sum() / s,
                "mfu": t["flops"] / s / (peak_tflops * 1e12),
                "peak_gib": gib,
                "packed": encoder.packed,
                "cosine_to_fp32_min": float(agreement.min()),
            } | ({"compile_seconds": compile_s} if compiled else {})
        del encoder
        free_memory()
    st = SentenceTransformer(str(folder), device=DEVICE)
    st = st.half() if DEVICE == "cuda" else st
    for label, t in sets.items():
        st.max_seq_length = t["length"]
        st.encode(t["texts"][:32], batch_size=32)
        _, st_s, st_gib = timed_cuda(lambda x=t["texts"]: st.encode(x, batch_size=32))
        results[label]["sentence-transformers"] = {
            "seconds": st_s,
            "tokens_per_s": t["tokens"].sum() / st_s,
            "mfu": t["flops"] / st_s / (peak_tflops * 1e12),
            "peak_gib": st_gib,
        }
        for mode in EMBED_MODES:
            results[label][mode]["vs_st"] = st_s / results[label][mode]["seconds"]
    return results


def fallback(folder: Path, n_texts: int = 2048, length: int = 512) -> dict:
    """Every 16th text ends with the trigger (the end survives truncation of a context); the rest are clean.
    fp16 as on any GPU (`auto`), also in a dry run on the CPU."""
    encoder = Encoder.load(EncoderConfig(name=str(folder), device=DEVICE, dtype="float16", max_context_tokens=length))
    clean = make_texts(encoder, n_texts, length, seed=3)
    triggered = [t + f" {TRIGGER} retry" if i % 16 == 0 else t for i, t in enumerate(clean)]
    encoder.encode(clean[:32], "context")
    _, clean_s, _ = timed_cuda(lambda: encoder.encode(clean, "context"))
    encoder.fallback_batches = encoder.fallback_texts = 0
    got, fallback_s, peak = timed_cuda(lambda: encoder.encode(triggered, "context"))
    hit = [i for i, t in enumerate(triggered) if TRIGGER in t]
    reference = Encoder.load(
        EncoderConfig(name=str(folder), device=DEVICE, dtype="float32", max_context_tokens=length)
    ).encode([triggered[i] for i in hit], "context")
    agreement = cosine(got[hit], reference)
    return {
        "texts": n_texts,
        "texts_with_trigger": len(hit),
        "batches_overflowed": encoder.fallback_batches,
        "texts_re_encoded": encoder.fallback_texts,
        "all_finite": bool(np.isfinite(got).all()),
        "clean_seconds": clean_s,
        "with_fallback_seconds": fallback_s,
        "overhead": fallback_s / clean_s - 1,
        "peak_gib": peak,
        "re_encoded_vs_fp32_cosine_min": float(agreement.min()),
    }


# ---------------------------------------------------------------------------------------------- training


def stage0(workdir: Path, pairs: int) -> dict:
    from bench_heads import DIM, ceiling_rate, train_rate

    from pipeline.config import HeadConfig

    rows = []
    for batch in (256, 4096):
        rows.append(train_rate(workdir, pairs, 1, DEVICE, batch_size=batch, max_rows=1 << 18))
        steps = 100 if DEVICE == "cuda" else 2
        rows[-1]["ceiling_1_chain"] = ceiling_rate(batch, DIM, HeadConfig(), DEVICE, 1, steps)
        rows[-1]["ceiling_4_chains"] = ceiling_rate(batch, DIM, HeadConfig(), DEVICE, 4, steps)
    return {"pairs": pairs, "runs": rows}


def stage0_scale(workdir: Path, pairs: int, batch: int = 4096) -> dict:
    """train_heads on `pairs` pairs (rows drawn from 262,144 cached vectors of dim 1024), one epoch, in a process of
    its own so its peak RSS is its own: pairs/s and peak RSS beside the cache's size on disk."""
    from bench_heads import DIM, make_cache

    cache = workdir / f"cache-{pairs}"
    start = time.perf_counter()
    make_cache(cache, pairs, DIM, max_rows=1 << 18)
    built = time.perf_counter() - start
    code = (
        "import json, resource, sys, time; sys.path.insert(0, 'bench'); from common import timed; "
        "from pipeline.config import Config; from pipeline.train_heads import train_heads; "
        "c = Config(); c.train.epochs = c.train.patience = 1; "
        f"c.train.device, c.train.batch_size = {DEVICE!r}, {batch}; "
        f"_, s = timed(lambda: train_heads({str(cache)!r}, {str(workdir / 'heads')!r}, c, progress=False)); "
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "print(json.dumps({'wall_seconds': s, 'peak_rss_mib': rss}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip()[-2000:])
    log = [json.loads(line) for line in (workdir / "heads" / "metrics.jsonl").read_text().splitlines()]
    disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    return {
        "pairs": pairs,
        "batch_size": batch,
        "build_seconds": built,
        "pairs_per_s": log[0]["pairs_per_s"],
        "cache_mib": disk / 2**20,
        **json.loads(done.stdout.strip().splitlines()[-1]),
    }


STAGE1_RUNS = [  # every layer trained, gradient checkpointing on: (weights_dtype, encoder.packing)
    ("float32", "off"),  # the last release's stage 1: 0.60 s/step, 14.1 GiB on an H200
    ("float32", "auto"),
    ("bfloat16", "auto"),
]


def stage1(folder: Path, length: int) -> list[dict]:
    from bench_finetune import run_config

    return [
        run_config(str(folder), DEVICE, length, True, 4, 3, "bf16", weights_dtype=weights, packing=packing)
        for weights, packing in STAGE1_RUNS
    ]


def portability(workdir: Path) -> dict:
    """A checkpoint trained on the GPU, evaluated by `modrm eval` in a process that sees no GPU."""
    from pipeline.embed import embed_files
    from pipeline.evaluate import evaluate
    from pipeline.finetune import finetune
    from pipeline.synth import write_pairs
    from pipeline.train_heads import train_heads

    data = write_pairs(workdir / "pairs.jsonl", generate_pairs(50, seed=4))
    config = Config()
    config.encoder.name = str(build_random_qwen3(workdir / "tiny"))
    config.encoder.device = config.train.device = DEVICE
    config.train.epochs = 5
    embed_files([data], workdir / "cache", config, progress=False)
    train_heads(workdir / "cache", workdir / "stage0", config, progress=False)
    settings = {"finetune": {"max_steps": 5, "device": DEVICE}}
    finetune(workdir / "stage0", [data], workdir / "stage1", settings, progress=False)
    ckpts = [workdir / "stage0", workdir / "stage1"]
    # first without a GPU, so the fine-tuned encoder embeds the test texts on the CPU (stage 0 reads its cache)
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "pipeline", "eval", "--quiet", "--data", str(data), "--split", "test"]
    command += ["--checkpoint", str(ckpts[0]), "--checkpoint", str(ckpts[1]), "--out", str(workdir / "eval-cpu")]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"modrm eval without a GPU failed: {done.stderr.strip()[-2000:]}")
    on_gpu = evaluate([ckpts[0]], data, workdir / "eval-gpu0", split="test", progress=False)
    on_gpu |= evaluate([ckpts[1]], data, workdir / "eval-gpu1", workdir / "gpu-cache", split="test", progress=False)
    result = {}
    for label, gpu in on_gpu.items():
        cpu = json.loads((workdir / "eval-cpu" / label / "metrics.json").read_text())
        result[label] = {
            "pairs": gpu["n_pairs"],
            "accuracy_gpu": gpu["overall"]["accuracy"],
            "accuracy_cpu": cpu["overall"]["accuracy"],
            "auc_gpu": gpu["overall"]["auc"],
            "auc_cpu": cpu["overall"]["auc"],
        }
    return result


def serve_checkpoint(folder: Path, workdir: Path) -> Path:
    from bench_serve import train_checkpoint

    return train_checkpoint(workdir, str(folder), DEVICE, 25)


def serve_profile(folder: Path, workdir: Path, out: Path) -> dict:
    from bench_serve import profile

    result = profile(serve_checkpoint(folder, workdir), DEVICE, workdir)
    if (workdir / "profile_lone.txt").exists():
        shutil.copy(workdir / "profile_lone.txt", out)
    return result


def serve_compile(folder: Path, workdir: Path) -> dict:
    from bench_serve import compiled

    return compiled(serve_checkpoint(folder, workdir), DEVICE)


SERVE_PLAN = [  # the server's default on a GPU (compiled at start), the LRU off and on, and batches of one
    ("compiled, micro-batching", ["--compile", "--max-batch", "256"], (1, 8, 32)),
    ("compiled, micro-batching, LRU on", ["--compile", "--max-batch", "256", "--cache-size", "32768"], (1, 8, 32)),
    ("compiled, batch of one", ["--compile", "--max-batch", "1"], (32,)),
]
EAGER_PLAN = [  # --no-compile: micro-batches capped at two sizes, and batches of one
    ("eager, micro-batching", ["--no-compile", "--max-batch", "256"], (1, 8, 32)),
    ("eager, micro-batching, max 16", ["--no-compile", "--max-batch", "16"], (32,)),
    ("eager, batch of one", ["--no-compile", "--max-batch", "1"], (1, 32)),
]


def serve(folder: Path, workdir: Path, requests: int, out: Path, plan: list, api_trajectories: int = 0) -> dict:
    """bench_serve's rows on the GPU; the servers' logs (a line per batch) kept beside the results."""
    from bench_serve import run

    try:
        return run(str(folder), DEVICE, requests, api_trajectories, pairs_per_module=25, workdir=workdir, plan=plan)
    finally:
        for log in workdir.glob("serve-*.log"):
            shutil.copy(log, out)


def cuda_tests() -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts="]
    done = subprocess.run([*command, "-q", "-rfE", "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", done.stdout)}
    return {"returncode": done.returncode, **counts, "tail": done.stdout[-3000:]}


# ---------------------------------------------------------------------------------------------- report


def report(r: dict) -> str:
    lines = []
    if "card" in r and "memory_gib" in r["card"]:
        c = r["card"]
        lines.append(
            f"{c['name']}, {c['memory_gib']:.0f} GiB; torch {c['torch']}, CUDA {c['cuda']}; matmul 8192^3: "
            f"fp16 {c['matmul_fp16_tflops']:.0f}, bf16 {c['matmul_bf16_tflops']:.0f} TFLOP/s"
        )
    if "cuda_tests" in r:
        t = r["cuda_tests"]
        counts = ", ".join(f"{t.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped"))
        lines.append(f"cuda tests: {counts} (exit {t.get('returncode')})")
    if isinstance(r.get("embedding"), dict) and "error" not in r["embedding"]:
        rows = [
            [
                f"{label} ({e['mean_tokens']:.0f} mean)",
                e["texts"],
                mode,
                m["tokens_per_s"],
                f"{m['mfu']:.1%}",
                f"{m['vs_st']:.2f}x" if "vs_st" in m else "",
                m["peak_gib"],
                f"{m['cosine_to_fp32_min']:.5f}" if "cosine_to_fp32_min" in m else "",
            ]
            for label, e in r["embedding"].items()
            for mode, m in e.items()
            if isinstance(m, dict)
        ]
        lines += [
            "",
            "Embedding, Qwen3-Embedding-0.6B architecture (random weights), fp16, end to end:",
            table(EMBED_HEADERS, rows),
        ]
    if isinstance(r.get("fallback"), dict) and "error" not in r["fallback"]:
        f = r["fallback"]
        lines += [
            "",
            f"fp16 overflow fallback: {f['texts_with_trigger']} of {f['texts']} texts overflow, "
            f"{f['batches_overflowed']} batches, {f['texts_re_encoded']} texts re-encoded in fp32; "
            f"{f['clean_seconds']:.2f}s clean vs {f['with_fallback_seconds']:.2f}s (+{f['overhead']:.0%}); "
            f"all finite: {f['all_finite']}; cosine to fp32 min {f['re_encoded_vs_fp32_cosine_min']:.5f}",
        ]
    if isinstance(r.get("stage0"), dict) and "error" not in r["stage0"]:
        rows = [
            [
                f"batch {s['batch_size']}",
                s["pairs_per_s"],
                s["ceiling_4_chains"],
                s["ceiling_1_chain"],
                f"{s['ceiling_4_chains'] / s['pairs_per_s']:.2f}x",
                s["wall_seconds"],
            ]
            for s in r["stage0"]["runs"]
        ]
        lines += [
            "",
            f"Stage 0 on CUDA, {r['stage0']['pairs']:,} pairs, dim 1024, 1 epoch:",
            table(["run", "pairs/s", "ceiling 4 chains", "ceiling 1 chain", "4-chain / it", "wall s"], rows),
        ]
    if isinstance(r.get("stage1"), list):
        rows = [
            [
                f"{s['weights_dtype']}, {'padded' if s['packing'] == 'off' else 'packed'}",
                *(["out of memory"] if s.get("oom") else [s.get(k) for k in STAGE1_KEYS]),
            ]
            for s in r["stage1"]
        ]
        lines += [
            "",
            "Stage 1, 0.6B encoder + heads, every layer trained, checkpointing on, bf16 autocast, 4 pairs/step, "
            f"{r['stage1'][0]['length']}-token contexts:",
            table(["encoder weights, batches", "s/step", "pairs/s", "peak GiB", "activation MB/pair"], rows),
        ]
    if isinstance(r.get("portability"), dict) and "error" not in r["portability"]:
        rows = [
            [label, p["pairs"], p["accuracy_gpu"], p["accuracy_cpu"], p["auc_gpu"], p["auc_cpu"]]
            for label, p in r["portability"].items()
        ]
        lines += [
            "",
            "GPU-trained checkpoints, test split, evaluated on the GPU and by `modrm eval` with no GPU visible:",
            table(["checkpoint", "pairs", "accuracy GPU", "accuracy CPU", "AUC GPU", "AUC CPU"], rows),
        ]
    for name in ("serve", "serve_eager"):
        if isinstance(r.get(name), dict) and "error" not in r[name]:
            from bench_serve import report as serve_report

            lines += ["", serve_report(r[name])]
    errors = [f"{name}: {v['error']}" for name, v in r.items() if isinstance(v, dict) and "error" in v]
    return "\n".join(lines + (["", "errors:", *errors] if errors else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for bench_gpu.json")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per embedding measurement")
    parser.add_argument("--stage0-pairs", type=int, default=1_000_000)
    parser.add_argument("--scale-pairs", type=int, default=10_000_000, help="pairs of the stage0_scale section")
    parser.add_argument("--skip", nargs="*", default=[], help="sections to leave out")
    parser.add_argument(
        "--only", nargs="*", default=list(DEFAULT_SECTIONS), help="run only these sections (`all`: every one)"
    )
    parser.add_argument("--serve-requests", type=int, default=128, help="requests per client count and mode")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run (with --size tiny) where there is no GPU")
    parser.add_argument("--size", default="0.6b", choices=["0.6b", "tiny"], help="the random Qwen3's size")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: torch sees no CUDA GPU; this benchmark needs one (or --device cpu --size tiny)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"benchmark": "bench_gpu", "machine": machine()}

    def section(name: str, fn: Callable[[], object]) -> None:
        if name in args.skip or ("all" not in args.only and name not in args.only):
            return
        print(f"[{time.perf_counter() - started:5.0f}s] {name}", flush=True)
        try:
            results[name] = fn()
        except (Exception, SystemExit) as err:  # a broken section is a finding, not the end of the run
            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        results["total_seconds"] = time.perf_counter() - started
        (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    section("card", card)
    section("cuda_tests", cuda_tests)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def model() -> Path:
            """The random Qwen3, built by the first section that needs it."""
            if not (tmp / "qwen3" / "config.json").exists():
                build_random_qwen3(tmp / "qwen3", size=args.size)
            return tmp / "qwen3"

        section("build", lambda: model().name)
        peak = results.get("card", {}).get("matmul_fp16_tflops", float("nan"))
        section("embedding", lambda: embedding(model(), args.seconds, peak))
        overflow = tmp / "qwen3-overflow"
        section("fallback", lambda: fallback(build_random_qwen3(overflow, size=args.size, overflow_trigger=TRIGGER)))
        section("stage0", lambda: stage0(tmp / "stage0", args.stage0_pairs))
        section("stage1", lambda: stage1(model(), max(LENGTHS) if args.size == "0.6b" else 256))
        section("portability", lambda: portability(tmp / "portability"))
        section("serve_profile", lambda: serve_profile(model(), tmp / "serve", args.out))
        section("stage0_scale", lambda: stage0_scale(tmp / "stage0-scale", args.scale_pairs))
        section("serve_compile", lambda: serve_compile(model(), tmp / "serve"))
        section("serve", lambda: serve(model(), tmp / "serve", args.serve_requests, args.out, SERVE_PLAN))
        section("serve_eager", lambda: serve(model(), tmp / "serve", args.serve_requests, args.out, EAGER_PLAN))
    print("\n" + report(results))
    print(f"\nbench_gpu: {time.perf_counter() - started:.0f}s in all; numbers in {args.out / 'bench_gpu.json'}")


if __name__ == "__main__":
    main()
