"""`modrm`: the command line. Each command maps its flags onto the config and calls one pipeline function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import Config, load_config
from pipeline.errors import ModrmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train module-level reward models for multi-module LLM agents, and score trajectories.",
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file with any of the settings")]
DataOpt = Annotated[list[Path], typer.Option("--data", help="pairs file (JSON array, JSONL or seed flat format)")]
EncoderOpt = Annotated[str | None, typer.Option("--encoder", help="Hugging Face id or local folder")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda")]
SeedOpt = Annotated[int | None, typer.Option("--seed")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
CacheOpt = Annotated[Path, typer.Option("--cache", help="cache folder")]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="fail at once if another process is writing the cache")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="let the encoder folder's own Python files run (only for folders you trust)"
    ),
]
NO_VAL = "no val split (too few task groups for one): trained without validation, the checkpoint keeps the last epoch"


def _config(path: Path | None, **sections: dict) -> Config:
    return load_config(path, sections)


def _cache_config(cache: Path, path: Path | None, fixed: dict, **sections: dict) -> Config:
    """Defaults < the config saved with the cache (if it has one) < --config < flags."""
    from pipeline.cache import read_manifest
    from pipeline.config import config_from_dict

    manifest = read_manifest(cache) or {}
    saved = config_from_dict(manifest["config"], f"{cache}/manifest.json") if "config" in manifest else None
    return load_config(path, sections, saved, f"cache {cache}", fixed)


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="pairs file to write (.jsonl or .json)")],
    pairs_per_module: Annotated[int, typer.Option("--pairs-per-module", min=1)] = 100,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    holdout_phrasings: Annotated[
        bool, typer.Option("--holdout-phrasings", help="word the test split's pairs in a wording train never uses")
    ] = False,
    off_task_test: Annotated[
        bool,
        typer.Option("--off-task-test", help="with --holdout-phrasings: every test negative is another task's text"),
    ] = False,
    max_rounds: Annotated[
        int | None, typer.Option("--max-rounds", help="rounds per trajectory: 1 to this (at most 6; rollouts: 2)")
    ] = None,
    swapped_share: Annotated[
        float,
        typer.Option("--swapped-share", help="share of negatives that swap two components' roles (0 to 1)"),
    ] = 0.0,
    rollouts: Annotated[
        bool, typer.Option("--rollouts", help="write RL rollouts (chat form, with ground truth) instead of pairs")
    ] = False,
    tasks: Annotated[int, typer.Option("--tasks", min=1, help="with --rollouts: tasks")] = 100,
    group_size: Annotated[int, typer.Option("--group-size", min=1, help="with --rollouts: rollouts per task")] = 8,
    branched: Annotated[
        bool, typer.Option("--branched", help="with --rollouts: rollouts branch from earlier ones (shared prefixes)")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Write synthetic preference pairs (varied multi-round trajectories, negatives differing in one module), or
    with --rollouts GRPO-style groups of rollouts whose outcome depends on their modules' outputs."""
    from pipeline.synth import MAX_ROUNDS, generate_pairs, generate_rollouts, write_pairs, write_rollouts

    if rollouts:
        records = generate_rollouts(tasks, group_size, seed, branched, 2 if max_rounds is None else max_rounds)
        typer.echo(f"wrote {write_rollouts(out, records)} rollouts of {tasks} tasks to {out}")
        return
    max_rounds = MAX_ROUNDS if max_rounds is None else max_rounds
    cfg = _config(config)
    split = cfg.data if holdout_phrasings else None
    pairs = generate_pairs(pairs_per_module, seed, cfg.data.modules, split, off_task_test, max_rounds, swapped_share)
    write_pairs(out, pairs)
    typer.echo(f"wrote {len(pairs)} pairs to {out}")


@app.command("pairs")
def pairs_cmd(
    rollouts: Annotated[list[Path], typer.Option("--rollouts", help="rollouts file (JSON lines or a JSON array)")],
    out: Annotated[Path, typer.Option("--out", help="pairs file to write (JSON lines)")],
    strategy: Annotated[str, typer.Option("--strategy", help="contrast | anchor")] = "contrast",
    min_gap: Annotated[float, typer.Option("--min-gap", help="least outcome difference between the sides")] = 0.5,
    min_support: Annotated[int, typer.Option("--min-support", help="anchor: least rollouts behind each side")] = 2,
    max_pairs_per_task: Annotated[int, typer.Option("--max-pairs-per-task", help="pairs per task at most")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="the sampling of a task's pairs")] = 0,
    module_field: Annotated[
        str, typer.Option("--module-field", help="the chat message field naming its module")
    ] = "name",
    module: Annotated[
        str | None, typer.Option("--module", help="names to modules: NAME=MODULE,... (e.g. AutoGen agent names)")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Mine module-level preference pairs from RL rollouts (GRPO groups, branched or tree-search rollouts)."""
    from pipeline.mine import MineOptions, mine_rollouts
    from pipeline.rollouts import RolloutFormat, parse_module_map

    options = MineOptions(strategy, min_gap, min_support, max_pairs_per_task, seed)
    fmt = RolloutFormat(module_field, parse_module_map(module))
    summary = mine_rollouts(rollouts, out, options, fmt, progress=not quiet)
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"pairs: {out}")


@app.command()
def validate(data: DataOpt, config: ConfigOpt = None) -> None:
    """Check pairs files and report every problem at once."""
    from pipeline.data import check_file

    cfg = _config(config)
    problems = []
    for path in data:
        pairs, found = check_file(path, cfg.data.modules)
        problems += found
        typer.echo(f"{path}: {len(pairs)} valid pairs, {len(found)} problems")
    for problem in problems:
        typer.echo(str(problem), err=True)
    if problems:
        raise typer.Exit(2)


@app.command()
def embed(
    data: DataOpt,
    cache: CacheOpt,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
    append: Annotated[bool, typer.Option("--append", help="add these pairs to the cache's pairs index")] = False,
    no_wait: NoWaitOpt = False,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Precompute context and module embeddings into the cache (only texts it lacks; sharded under torchrun)."""
    from pipeline.config import ENCODER_IDENTITY
    from pipeline.distributed import leave_group
    from pipeline.embed import embed_files

    cfg = _cache_config(cache, config, {"encoder": ENCODER_IDENTITY}, encoder={"name": encoder, "device": device})
    summary = embed_files(data, cache, cfg, progress=not quiet, append=append, wait=not no_wait)
    if not leave_group():
        return
    typer.echo(f"cache {cache}:")
    for line in summary.lines():
        typer.echo("  " + line)


cache_app = typer.Typer(help="Look after an embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("compact")
def cache_compact(cache: CacheOpt, no_wait: NoWaitOpt = False) -> None:
    """Merge a cache's segments into one (each `embed` run that adds texts writes one)."""
    from pipeline.cache import Cache, read_manifest

    if read_manifest(cache) is None:
        raise ModrmError(f"{cache}: not an embedding cache (no manifest.json)")
    with Cache.open(cache, wait=not no_wait) as store:
        merged = store.compact()
    typer.echo(f"{cache}: {merged} segments merged into one" if merged else f"{cache}: one segment already")


@app.command("train-heads")
def train_heads_cmd(
    cache: Annotated[Path, typer.Option("--cache", help="cache folder written by `modrm embed`")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint folder")],
    epochs: Annotated[int | None, typer.Option("--epochs", min=1)] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Stage 0: train one reward head per module from the cached embeddings."""
    from pipeline.config import FIXED_BY_CACHE
    from pipeline.train_heads import train_heads

    cfg = _cache_config(cache, config, FIXED_BY_CACHE, train={"epochs": epochs, "seed": seed, "device": device})
    summary = train_heads(cache, out, cfg, progress=not quiet)
    val = summary["val"]
    if val is None:
        typer.echo(f"{summary['epochs_run']} epochs on {summary['n_train']} train pairs; {NO_VAL}")
    else:
        typer.echo(
            f"best epoch {summary['best_epoch']} of {summary['epochs_run']}: val loss {val['val_loss']:.4f}, "
            f"val accuracy {val['val_accuracy']:.3f} ({summary['n_train']} train / {summary['n_val']} val pairs)"
        )
        for name, m in val["val_modules"].items():
            typer.echo(f"  {name:<12} val accuracy {m['accuracy']:.3f}  ({m['n_pairs']} pairs)")
    typer.echo(f"checkpoint: {out}")


@app.command("finetune")
def finetune_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="stage-0 checkpoint folder")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="stage-1 checkpoint folder")],
    epochs: Annotated[int | None, typer.Option("--epochs", min=1)] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="stop after N optimizer steps")] = None,
    token_budget: Annotated[int | None, typer.Option("--token-budget", help="padded tokens per step")] = None,
    grad_accum: Annotated[
        int | None, typer.Option("--grad-accum", min=1, help="steps per optimizer step (shared among processes)")
    ] = None,
    train_layers: Annotated[int | None, typer.Option("--train-layers", help="train only the top K layers")] = None,
    lora: Annotated[int | None, typer.Option("--lora", help="LoRA rank (needs peft)")] = None,
    gradient_checkpointing: Annotated[str | None, typer.Option("--gradient-checkpointing", help="auto|on|off")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run in --out")] = False,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Stage 1: reload the encoder and fine-tune encoder and heads end to end (several processes under torchrun)."""
    from pipeline.distributed import leave_group
    from pipeline.finetune import finetune

    flags = {
        "epochs": epochs,
        "max_steps": max_steps,
        "token_budget": token_budget,
        "grad_accum": grad_accum,
        "train_layers": train_layers,
        "lora_r": lora,
        "gradient_checkpointing": gradient_checkpointing,
        "device": device,
        "seed": seed,
    }
    from pipeline.checkpoint import read_checkpoint_config
    from pipeline.config import FIXED_BY_CHECKPOINT

    saved = read_checkpoint_config(checkpoint)[1]
    cfg = load_config(config, {"finetune": flags}, saved, f"checkpoint {checkpoint}", FIXED_BY_CHECKPOINT)
    result = finetune(checkpoint, data, out, cfg.to_dict(), resume=resume, progress=not quiet)
    if not leave_group():  # under torchrun: rank 0 alone reports
        return
    best = result["best"]
    if best["val_loss"] is None:
        typer.echo(f"{best['epoch']} epochs on {result['n_train']} train pairs; {NO_VAL}")
    else:
        typer.echo(
            f"best epoch {best['epoch']}: val loss {best['val_loss']:.4f}, val accuracy {best['val_accuracy']:.3f} "
            f"({result['n_train']} train / {result['n_val']} val pairs)"
        )
    if best["epoch"] == 0:
        typer.echo("no epoch beat the stage-0 starting point on val loss: the checkpoint keeps those weights")
    typer.echo(f"checkpoint: {out}")


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[list[Path], typer.Option("--checkpoint", help="checkpoint folder; give two to compare")],
    data: Annotated[Path, typer.Option("--data", help="pairs file to score")],
    out: Annotated[Path, typer.Option("--out", help="folder for metrics.json, report.md and plots")],
    cache: Annotated[Path | None, typer.Option("--cache", help="embedding cache (default: the checkpoint's)")] = None,
    split: Annotated[
        str, typer.Option("--split", help="auto (leave out what the checkpoint trained on) | all | train | val | test")
    ] = "auto",
    device: DeviceOpt = None,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score pairs with trained heads: accuracy, AUC, separation per module, report and plots."""
    from pipeline.evaluate import evaluate, format_table

    results = evaluate(
        checkpoint, data, out, cache, split, not quiet, device or "auto", trust_remote_code=trust_remote_code
    )
    typer.echo(format_table(results))
    typer.echo(f"report: {out / 'report.md'}  plots: {out}")


@app.command("score")
def score_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="checkpoint folder")],
    input: Annotated[Path, typer.Option("--input", help="JSONL of {id, task, trajectory}")],
    out: Annotated[Path, typer.Option("--out", help="JSONL of {id, rewards: {module: reward}}")],
    device: DeviceOpt = None,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-module rewards for raw tagged trajectories."""
    from pipeline.score import score_file

    n = score_file(checkpoint, input, out, device or "auto", not quiet, trust_remote_code)
    typer.echo(f"scored {n} trajectories -> {out}")


@app.command("serve")
def serve_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="checkpoint folder")],
    host: Annotated[str, typer.Option("--host", help="address to bind (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    device: DeviceOpt = None,
    weights: Annotated[str | None, typer.Option("--weights", help="module weights of the reward, m=w,...")] = None,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="environment variable holding a bearer token to require")
    ] = None,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0, help="micro-batch gathering time")] = 5.0,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="trajectories per model call")] = 256,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="trajectories waiting; then 503")] = 4096,
    max_items: Annotated[int, typer.Option("--max-items", min=1, help="trajectories per request")] = 1024,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0, help="request body limit")] = 16.0,
    cache_size: Annotated[int, typer.Option("--cache-size", min=0, help="embeddings kept between calls")] = 32768,
    compile: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help="compile the encoder's layers at start; default: on a GPU"),
    ] = None,
    empty_reward: Annotated[
        float, typer.Option("--empty-reward", help="/get_reward's reward for a trajectory with no module text")
    ] = 0.0,
    shutdown_timeout: Annotated[
        float, typer.Option("--shutdown-timeout", min=0, help="seconds requests in flight get to finish on SIGTERM")
    ] = 60.0,
    header_timeout: Annotated[
        float, typer.Option("--header-timeout", min=0.001, help="seconds a connection gets to send a request's headers")
    ] = 10.0,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", min=0.001, help="seconds from a request's headers to its answer")
    ] = 300.0,
    max_connections: Annotated[
        int | None,
        typer.Option("--max-connections", min=1, help="open connections; default: 1000 or below the open-file limit"),
    ] = None,
    trust_remote_code: TrustOpt = False,
    learn: Annotated[
        Path | None,
        typer.Option("--learn", help="learn online: POST /pairs and /rollouts refresh the heads; state kept here"),
    ] = None,
    refresh_pairs: Annotated[int, typer.Option("--refresh-pairs", min=1, help="new pairs that start a refresh")] = 1000,
    refresh_seconds: Annotated[
        float, typer.Option("--refresh-seconds", min=0, help="or seconds after new pairs arrived")
    ] = 600.0,
    max_regression: Annotated[
        float, typer.Option("--max-regression", min=0, help="val accuracy a new version may lose; else refused")
    ] = 0.02,
    replay: Annotated[
        Path | None, typer.Option("--replay", help="cache of the checkpoint's training pairs (default: its own)")
    ] = None,
    refresh_epochs: Annotated[int, typer.Option("--refresh-epochs", min=1, help="epochs per refresh, at most")] = 5,
) -> None:
    """Serve rewards over HTTP for RL loops (OpenRLHF's /get_reward, /score, /health, /info)."""
    import logging
    import math
    import os

    from pipeline.connections import check_max_connections, default_max_connections
    from pipeline.learner import LearnConfig
    from pipeline.reward import RewardModel
    from pipeline.serve import ServeConfig, parse_weights, serve

    numbers = {
        "--batch-wait-ms": batch_wait_ms,
        "--max-body-mb": max_body_mb,
        "--empty-reward": empty_reward,
        "--shutdown-timeout": shutdown_timeout,
        "--header-timeout": header_timeout,
        "--request-timeout": request_timeout,
        "--refresh-seconds": refresh_seconds,
        "--max-regression": max_regression,
    }
    for flag, value in numbers.items():
        if not math.isfinite(value):
            raise ModrmError(f"{flag} {value}: must be a finite number")
    if max_connections is not None:
        check_max_connections(max_connections)
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ModrmError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    config = ServeConfig(
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
        max_queue=max_queue,
        max_items=max_items,
        max_body_bytes=int(max_body_mb * 2**20),
        weights=parse_weights(weights),
        empty_reward=empty_reward,
        api_key=api_key,
        shutdown_timeout_s=shutdown_timeout,
        header_timeout_s=header_timeout,
        request_timeout_s=request_timeout,
        max_connections=max_connections or default_max_connections(),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if compile is None:  # a server lives long enough to repay ~20 s of compiling where it pays: on a GPU
        from pipeline.encoder import pick_device

        compile = pick_device(device or "auto").type == "cuda"
    rm = RewardModel.load(checkpoint, device or "auto", cache_size, compile, trust_remote_code)
    rm.check_weights(config.weights)
    learning = None
    if learn is not None:
        learning = LearnConfig(learn, refresh_pairs, refresh_seconds, max_regression, replay, refresh_epochs)
    serve(rm, config, host, port, learning)


def main() -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except ModrmError as err:
        from pipeline.data import capped

        typer.echo("error: " + capped(" ".join(str(err).split())), err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
