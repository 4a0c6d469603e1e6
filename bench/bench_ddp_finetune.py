"""Stage-1 fine-tuning throughput (pairs/s) on 1 process against 2 (torchrun, gloo on CPU), on the real MiniLM.

Each configuration is a torchrun launch of this script as a worker, which runs the optimizer-step loop of
`modrm finetune` (pipeline/finetune.py) with its own parts: encoder and heads under DistributedDataParallel
(`Group.wrap`), each rank taking its share of the window's micro-steps with the loss normalised by the pair counts
of the whole window (`window_gradients`; DDP all-reduces in the last backward), then clipping and AdamW in fp32
(`Optimization`). Validation, snapshots and checkpoints are left out: they are not per step. The batch is the
same global batch in every configuration: `--grad-accum` micro-steps of `--pairs` pairs per optimizer step (4
texts each: 2 contexts of `--length` tokens, 2 module texts of 64, built as in bench_finetune.py).

The cores are shared out the same way in every configuration: one process with every core as torch threads,
and N processes with cores / N threads each (what torchrun's OMP_NUM_THREADS does); one process on one
thread is shown too, for the per-core picture.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from common import ROOT, table, use_all_cores, warn_if_busy, write_results

MODULE_TOKENS = 64


def worker(args) -> dict:
    """One rank: load MiniLM and fresh heads, one warm-up optimizer step, then `steps` timed ones."""
    from bench_finetune import fixed_pairs

    from pipeline.config import Config, EncoderConfig
    from pipeline.data import DEFAULT_MODULES
    from pipeline.distributed import Group
    from pipeline.encoder import MINILM_ID, Encoder
    from pipeline.finetune import EndToEnd, window_gradients
    from pipeline.heads import RewardHeads
    from pipeline.training import Optimization, param_groups

    group = Group.from_env("cpu")
    cfg = Config()
    torch.manual_seed(0)  # the same fresh heads on every rank
    encoder = Encoder.load(EncoderConfig(name=MINILM_ID, device="cpu", dtype="float32"))
    model = EndToEnd(encoder, RewardHeads(DEFAULT_MODULES, encoder.dim, cfg.heads))
    trainer = group.wrap(model)
    per_window = args.grad_accum * args.pairs
    data = fixed_pairs(encoder, per_window * (args.steps + 1), args.length)
    micro = [np.arange(i, i + args.pairs) for i in range(0, len(data.module_idx), args.pairs)]
    plan = [micro[i : i + args.grad_accum] for i in range(0, len(micro), args.grad_accum)]
    groups = param_groups([(encoder.parameters(), 1e-5), (model.heads.parameters(), 1e-4)], 0.01)
    opt = Optimization(groups, len(plan), torch.device("cpu"), "float32", (0.9, 0.999), 0.1, 1.0)
    model.train()

    def step(window: list[np.ndarray]) -> None:
        window_gradients(trainer, data, window, len(DEFAULT_MODULES), opt, group, cfg.heads)
        opt.step()

    step(plan[0])  # warm-up
    group.barrier()
    start = time.perf_counter()
    for window in plan[1:]:
        step(window)
    group.barrier()
    seconds = (time.perf_counter() - start) / args.steps
    return {
        "seconds_per_step": seconds,
        "pairs_per_s": per_window / seconds,
        "gradient_mb": sum(p.numel() * p.element_size() for p in opt.params) / 2**20,
    }


def launch(nproc: int, threads: int, args) -> dict:
    """`worker` under torchrun with `nproc` processes of `threads` torch threads each."""
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__]
    command += ["--worker", "--pairs", str(args.pairs), "--grad-accum", str(args.grad_accum)]
    command += ["--steps", str(args.steps), "--length", str(args.length)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"worker failed ({nproc} processes):\n{done.stderr[-3000:]}")
    return {"processes": nproc, "threads_each": threads} | json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per micro-step")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-steps per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up step")
    parser.add_argument("--length", type=int, default=128, help="context tokens")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        result = worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result))
        return

    started = time.perf_counter()
    cores = use_all_cores()
    busy = warn_if_busy()
    print(
        f"bench_ddp_finetune: MiniLM fp32 on CPU, {cores} cores; an optimizer step = {args.grad_accum} micro-steps "
        f"x {args.pairs} pairs ({args.length}-token contexts)"
    )
    configs = [(1, cores), (1, 1), *((n, max(1, cores // n)) for n in (2,))]
    results = [launch(n, threads, args) for n, threads in configs]
    base = results[0]["pairs_per_s"]
    print()
    print(
        table(
            ["processes", "threads each", "s/step", "pairs/s", "vs 1 process"],
            [
                [
                    r["processes"],
                    r["threads_each"],
                    r["seconds_per_step"],
                    r["pairs_per_s"],
                    f"{r['pairs_per_s'] / base:.2f}x",
                ]
                for r in results
            ],
        )
    )
    print(
        f"(gradients all-reduced per optimizer step: {results[0]['gradient_mb']:.0f} MB fp32; every configuration "
        f"takes the same optimizer steps; {cores} cores shared out as torch threads)"
    )
    settings = {"pairs": args.pairs, "grad_accum": args.grad_accum, "steps": args.steps, "length": args.length}
    write_results("bench_ddp_finetune", {"settings": settings, "results": results}, started, busy)


if __name__ == "__main__":
    main()
