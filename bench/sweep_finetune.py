"""Stage-1 defaults by measurement: on pairs whose test split is worded as training never is
(`synth --holdout-phrasings`), test accuracy of stage 0 and of stage 1 per encoder learning rate and encoder
dropout, over seeds (MiniLM, CPU). `--off-task-test`: every test negative is off-task (`synth --off-task-test`),
the held-out set on which stage 0 falls short.

One stage-0 checkpoint (the default config) is trained per data seed; every stage-1 run starts from it with
the default config but for the swept keys, runs `--epochs` epochs and keeps its best epoch by val loss (what a
user gets); each is scored on the test split (held-out wording, never trained on) with `modrm eval`'s code.
Writes artifacts/bench/sweep_finetune.json and prints one table. Slow on a CPU: minutes per run.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from common import table, use_all_cores, warn_if_busy, write_results

from pipeline.config import Config
from pipeline.embed import embed_files
from pipeline.encoder import MINILM_ID
from pipeline.evaluate import evaluate
from pipeline.finetune import finetune
from pipeline.synth import generate_pairs, write_pairs
from pipeline.train_heads import train_heads


def stage0(workdir: Path, pairs_per_module: int, seed: int, off_task_test: bool) -> tuple[Path, Path, float]:
    config = Config()
    config.encoder.name, config.encoder.device, config.train.device = MINILM_ID, "cpu", "cpu"
    pairs = generate_pairs(pairs_per_module, seed, heldout_split=config.data, off_task_test=off_task_test)
    data = write_pairs(workdir / "pairs.jsonl", pairs)
    embed_files([data], workdir / "cache", config, progress=False)
    train_heads(workdir / "cache", workdir / "stage0", config, progress=False)
    accuracy = evaluate([workdir / "stage0"], data, workdir / "eval0", progress=False)["stage0"]["overall"]["accuracy"]
    return data, workdir / "stage0", accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs-per-module", type=int, default=100)
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--encoder-lr", type=float, nargs="+", default=[1e-5, 5e-5, 1e-4, 2e-4])
    parser.add_argument("--encoder-dropout", type=float, nargs="+", default=[-1.0, 0.0], help="-1: the model's own")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--off-task-test", action="store_true", help="every test negative off-task (synth's option)")
    args = parser.parse_args()
    started = time.perf_counter()
    cores = use_all_cores()
    busy = warn_if_busy()
    print(f"sweep_finetune: MiniLM on CPU, {cores} threads")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for data_seed in args.data_seeds:
            work = Path(tmp) / f"data{data_seed}"
            data, ckpt, acc0 = stage0(work, args.pairs_per_module, data_seed, args.off_task_test)
            print(f"data seed {data_seed}: stage 0 test accuracy {acc0:.3f}", flush=True)
            for lr, dropout, seed in itertools.product(args.encoder_lr, args.encoder_dropout, args.seeds):
                settings = {"epochs": args.epochs, "encoder_lr": lr, "seed": seed, "device": "cpu"}
                settings |= {"encoder_dropout": None if dropout < 0 else dropout}
                out = work / f"lr{lr}-d{dropout}-s{seed}"
                start = time.perf_counter()
                result = finetune(ckpt, [data], out, {"finetune": settings}, progress=False)
                test = evaluate([out], data, work / f"eval-{out.name}", progress=False)["stage1"]
                run = {
                    "data_seed": data_seed,
                    "seed": seed,
                    "encoder_lr": lr,
                    "encoder_dropout": None if dropout < 0 else dropout,
                    "best_epoch": result["best"]["epoch"],
                    "stage0_test_accuracy": acc0,
                    "stage1_test_accuracy": test["overall"]["accuracy"],
                    "test_pairs": test["n_pairs"],
                    "val_accuracy_by_epoch": [h["val_accuracy"] for h in result["history"]],
                    "seconds": time.perf_counter() - start,
                }
                runs.append(run)
                print(
                    f"  lr {lr:g} dropout {run['encoder_dropout']} seed {seed}: best epoch {run['best_epoch']}, "
                    f"test accuracy {run['stage1_test_accuracy']:.3f} ({run['seconds']:.0f}s)",
                    flush=True,
                )
    rows = []
    for (lr, dropout), group in itertools.groupby(
        sorted(runs, key=lambda r: (r["encoder_lr"], str(r["encoder_dropout"]))),
        key=lambda r: (r["encoder_lr"], r["encoder_dropout"]),
    ):
        group = list(group)
        gains = [r["stage1_test_accuracy"] - r["stage0_test_accuracy"] for r in group]
        rows.append(
            [
                f"{lr:g}",
                "model's" if dropout is None else dropout,
                len(group),
                statistics.mean(r["stage0_test_accuracy"] for r in group),
                statistics.mean(r["stage1_test_accuracy"] for r in group),
                f"{statistics.mean(gains):+.3f}",
                statistics.mean(r["best_epoch"] for r in group),
            ]
        )
    print(
        table(
            ["encoder lr", "encoder dropout", "runs", "stage 0 test acc", "stage 1 test acc", "gain", "best epoch"],
            rows,
        )
    )
    write_results("sweep_finetune", {"runs": runs, "args": vars(args)}, started, busy)


if __name__ == "__main__":
    main()
