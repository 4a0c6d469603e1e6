"""Stage 1: reload the encoder and train encoder and heads end to end on the raw texts.

`finetune` reads as three steps: `setup` (the stage-0 checkpoint and its encoder, the pairs tokenized, the step
plan, the optimizer), then `start` (a fresh run: the stage-0 weights validated and saved as epoch 0) or
`load_snapshot` (`--resume`), then `train` (optimizer steps, a validation at each epoch's end, the saves).

Steps are filled to a token budget from length buckets (all four texts of each pair counted, padded); `grad_accum`
steps make one optimizer step, over which every pair weighs the same. Every `save_every` optimizer steps and at
each epoch's end a snapshot (weights, optimizer, RNG, progress; safetensors + JSON, no pickle) lets `--resume`
continue a killed run from that snapshot exactly as the uninterrupted run went on; a snapshot names its run, so
another run's is refused. A fresh run's first save replaces everything an older checkpoint had in `--out`;
checkpoints and snapshots are replaced with `commit`, so a kill at any instant leaves the old ones or the new ones.

Under torchrun (N processes, one per GPU, or gloo on CPU) encoder and heads run under DistributedDataParallel;
every rank makes the same step plan for the global batch and takes its contiguous share of each optimizer step's
micro-steps (`window_gradients`), so N processes take the optimizer steps one would. Rank 0 alone writes
checkpoints, snapshots, the history and the logs, and shows the progress bar.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from pipeline.atomic import commit, write_json
from pipeline.checkpoint import ENCODER_DIR, HEADS_FILE, HEADS_FILES, Checkpoint, load_checkpoint, write_heads
from pipeline.config import FIXED_BY_CHECKPOINT, Config, FinetuneConfig, HeadConfig, resolve_config
from pipeline.data import Pair, file_sha256, load_pairs
from pipeline.distributed import Group
from pipeline.encoder import Encoder, Tokenized, describe, pick_device
from pipeline.errors import ModrmError
from pipeline.heads import RewardHeads, preference_loss
from pipeline.pairwise import PairSet, improves, scoring, side_rewards, split_by_group, val_record, validate
from pipeline.reporting import RUNS_DIR, Reporter
from pipeline.training import Optimization, module_counts, param_groups, stale_entries, windows

ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling")
SNAPSHOT_DIR, HISTORY_FILE = "resume", "finetune_history.json"


# ---------------------------------------------------------------------------------------------- data


@dataclass
class TokenizedPairs:
    """Unique texts of a set of pairs, tokenized once; `rows` points each pair's four texts into them."""

    contexts: Tokenized
    modules: Tokenized
    rows: np.ndarray  # int64 [n, 4]: pos ctx, pos mod, neg ctx, neg mod (ctx rows index contexts, mod rows modules)
    module_idx: np.ndarray

    def cost(self, idx: np.ndarray) -> int:
        """Padded tokens of a step over these pairs: 2k contexts and 2k module texts, each padded to its longest."""
        ctx = self.contexts.lengths[self.rows[idx][:, [0, 2]]].max()
        mod = self.modules.lengths[self.rows[idx][:, [1, 3]]].max()
        return int(2 * len(idx) * (ctx + mod))


def load_split(paths: list[Path], ckpt: Checkpoint) -> dict[str, list[Pair]]:
    """The train and val pairs of the data files, split by group as every command splits them (val may be empty:
    too few groups for one)."""
    pairs = load_pairs(paths, modules=[])
    ckpt.check_modules(pairs, paths[0])
    split_of = split_by_group((p.split_key for p in pairs), ckpt.config.data)
    split: dict[str, list[Pair]] = {"train": [], "val": [], "test": []}
    for pair in pairs:
        split[split_of[pair.split_key]].append(pair)
    if not split["train"]:
        raise ModrmError(f"{paths[0]}: no pairs to train on")
    return split


def tokenize_pairs(encoder: Encoder, pairs: list[Pair], modules: list[str]) -> TokenizedPairs:
    columns = list(zip(*(encoder.config.pair_texts(p) for p in pairs), strict=True))  # pos ctx, pos mod, neg ...
    heads = [encoder.config.context_head(p.task) for p in pairs]
    rows = np.empty((len(pairs), 4), dtype=np.int64)
    tokenized = {}
    for role, (a, b) in {"context": (0, 2), "module": (1, 3)}.items():
        unique = dict(zip(columns[a] + columns[b], heads + heads, strict=True))  # text -> its head, first seen order
        row_of = {t: i for i, t in enumerate(unique)}
        rows[:, a] = [row_of[t] for t in columns[a]]
        rows[:, b] = [row_of[t] for t in columns[b]]
        tokenized[role] = encoder.tokenize(list(unique), role, heads=list(unique.values()))
    lookup = {m: i for i, m in enumerate(modules)}
    module_idx = np.array([lookup[p.target_module] for p in pairs], dtype=np.int64)
    return TokenizedPairs(tokenized["context"], tokenized["module"], rows, module_idx)


BUCKET_STEPS = 16  # a bucket holds about this many steps' worth of pairs, of similar lengths


def plan_steps(data: TokenizedPairs, budget: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Pairs cut into steps that fit the token budget, from length buckets: the shuffled pairs are taken in
    buckets, each sorted by length and cut greedily, so a step's pairs have similar lengths and little of it is
    padding; then the steps are shuffled. Deterministic per seed and epoch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(data.module_idx))
    length = data.contexts.lengths[data.rows[:, [0, 2]]].max(1) + data.modules.lengths[data.rows[:, [1, 3]]].max(1)
    per_step = max(1, budget // (2 * int(np.median(length))))
    bucket = BUCKET_STEPS * per_step
    steps = []
    for lo in range(0, len(order), bucket):
        chunk = order[lo : lo + bucket]
        current: list[int] = []
        for i in chunk[np.argsort(-length[chunk], kind="stable")]:
            if current and data.cost(np.array([*current, i])) > budget:
                steps.append(np.array(current))
                current = []
            current.append(i)
        if current:
            steps.append(np.array(current))
    return [steps[k] for k in rng.permutation(len(steps))]


def cap_windows(plans: list[list[list]], n_windows: int) -> list[list[list]]:
    """The first `n_windows` optimizer steps of the plan (`--max-steps`)."""
    capped = []
    for epoch in plans:
        if n_windows <= 0:
            break
        capped.append(epoch[:n_windows])
        n_windows -= len(epoch)
    return capped


def check_budget(data: TokenizedPairs, budget: int) -> None:
    worst = max(data.cost(np.array([i])) for i in range(len(data.module_idx)))
    if worst > budget:
        raise ModrmError(
            f"finetune.token_budget {budget} is below the longest pair ({worst} padded tokens for its "
            "4 texts): raise --token-budget or lower encoder.max_context_tokens"
        )


# ---------------------------------------------------------------------------------------------- model


class EndToEnd(nn.Module):
    """Encoder + heads as one module, so one optimizer, one clip and one state dict cover both."""

    def __init__(self, encoder: Encoder, heads: RewardHeads):
        super().__init__()
        self.encoder, self.heads = encoder, heads

    def embed(self, tokens: Tokenized, rows: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.encoder.collate([tokens.ids[i] for i in rows.tolist()]))

    def forward(self, data: TokenizedPairs, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r_pos, r_neg, module_idx on the rewards' device) of the pairs at `idx`, their texts encoded now."""
        pairs = PairSet(torch.from_numpy(data.rows[idx]), torch.from_numpy(data.module_idx[idx]))
        r_pos, r_neg = side_rewards(
            self.heads, pairs, lambda rows: self.embed(data.contexts, rows), lambda rows: self.embed(data.modules, rows)
        )
        return r_pos, r_neg, pairs.module_idx.to(r_pos.device)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, whatever the architecture calls them (the ModuleList of num_hidden_layers)."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModrmError(f"cannot find the {n} transformer layers of {type(model).__name__} for --train-layers")


def freeze_layers(model: nn.Module, train_layers: int) -> None:
    """Train only the top K blocks and what follows them (final norm); the embedding block and lower layers
    stay frozen, so backward stops at the lowest trained layer."""
    layers = encoder_layers(model)
    if not 0 <= train_layers <= len(layers):
        raise ModrmError(f"--train-layers {train_layers}: the encoder has {len(layers)} layers")
    trainable = {id(p) for layer in layers[len(layers) - train_layers :] for p in layer.parameters()}
    in_layers = {id(p) for p in layers.parameters()}
    word_embeddings = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is word_embeddings)
    embedding_block = name.rsplit(".", 1)[0] if "." in name else name  # BERT: embeddings.*, Qwen3: embed_tokens
    for param_name, p in model.named_parameters():
        frozen_block = param_name.startswith(embedding_block + ".")
        p.requires_grad = id(p) in trainable or (id(p) not in in_layers and not frozen_block)


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward: memory per layer instead of per token (transformers 4 and 5 names)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_lora(encoder: Encoder, rank: int) -> None:
    """LoRA adapters on every linear layer; their initialisation draws from torch's RNG (seeded by the caller)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModrmError("--lora needs peft: pip install 'modrm[lora]'") from None
    encoder.model = get_peft_model(encoder.model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))


def set_encoder_dropout(model: nn.Module, p: float) -> None:
    """One dropout rate for the encoder: its dropout layers and the attention dropout that architectures keep as
    a plain number (Qwen3's `attention_dropout`, BERT's SDPA `dropout_prob`)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        for name in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)


def prepare_encoder(encoder: Encoder, fc: FinetuneConfig) -> None:
    """What trains (LoRA adapters, the top layers, or all), its dropout, and activation checkpointing."""
    if fc.lora_r > 0:
        add_lora(encoder, fc.lora_r)
    elif fc.train_layers is not None:
        freeze_layers(encoder.model, fc.train_layers)
    if fc.encoder_dropout is not None:
        set_encoder_dropout(encoder.model, fc.encoder_dropout)
    if fc.gradient_checkpointing == "on" or (
        fc.gradient_checkpointing == "auto" and encoder.fingerprint.max_context_tokens > 512
    ):
        enable_checkpointing(encoder.model)


def frozen_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder's blocks with nothing to train (the embedding block, lower layers): kept in eval mode, as the
    dropout there is noise that nothing learns from."""
    blocks = [*encoder_layers(model), model.get_input_embeddings()]
    embeddings = next((m for n, m in model.named_modules() if n.endswith("embeddings") and m is not model), None)
    blocks += [embeddings] if embeddings is not None else []
    return [b for b in blocks if not any(p.requires_grad for p in b.parameters())]


def train_mode(model: EndToEnd, frozen: list[nn.Module]) -> None:
    model.train()
    for block in frozen:
        block.eval()


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Progress:
    """Where a run stands, all a snapshot holds besides tensors: a record per validated epoch (epoch 0: the
    stage-0 start) and one per optimizer step. The position in the plan follows from them."""

    history: list[dict]
    steps: list[dict]

    @property
    def epoch(self) -> int:
        """Epochs finished."""
        return len(self.history) - 1

    @property
    def window(self) -> int:
        """Optimizer steps taken in the epoch under way."""
        return sum(1 for s in self.steps if s["epoch"] == self.epoch + 1)

    @property
    def best(self) -> dict:
        best = None
        for record in self.history:
            if improves(record, best):
                best = record
        return best

    def metrics(self) -> dict:
        """metrics.json of a stage-1 checkpoint: the best epoch and the curves so far."""
        return {"best": self.best, "history": self.history, "steps": self.steps}


@dataclass
class Run:
    """What a finetune run works with, made once by `setup` (every rank holds its own)."""

    config: Config
    out: Path
    identity: dict  # what names the run in its snapshots
    stale: list[str]  # what an older checkpoint left in `out`: a fresh run's first save removes it
    trained_on: list[dict]
    group: Group
    device: torch.device
    model: EndToEnd
    trainer: nn.Module  # the model under DistributedDataParallel; the model itself in one process
    frozen: list[nn.Module]
    opt: Optimization
    plans: list[list[list[np.ndarray]]]  # per epoch, per optimizer step: its micro-steps' pair indices
    train: TokenizedPairs
    val: TokenizedPairs | None  # None: the data has no val split

    @property
    def n_modules(self) -> int:
        return len(self.model.heads.module_names)


def finetune(
    checkpoint: str | Path,
    data: list[Path],
    out: str | Path,
    overrides: Mapping[str, Mapping] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """`modrm finetune`: returns the best epoch's validation metrics (the last epoch's where there is no val
    split); writes a stage-1 checkpoint to `out`.

    `overrides` are config sections ({"finetune": {"epochs": 2}, ...}) over the checkpoint's own config; what
    the checkpoint fixes (encoder, split, head sizes) may not change. Under torchrun every rank calls it with
    the same arguments and gets the same result; `out` must be on a filesystem every rank sees."""
    run = setup(Path(checkpoint), data, Path(out), overrides or {}, resume)
    state = load_snapshot(run) if resume else start(run)
    train(run, state, progress)
    return {
        "best": state.best,
        "history": state.history,
        "steps": state.steps,
        "n_train": len(run.train.module_idx),
        "n_val": 0 if run.val is None else len(run.val.module_idx),
    }


def setup(checkpoint: Path, data: list[Path], out: Path, overrides: Mapping, resume: bool) -> Run:
    """The checkpoint and its encoder made ready to train, the pairs tokenized and planned into steps."""
    ckpt = load_checkpoint(checkpoint)
    config = resolve_config(
        [("the given settings", overrides)], ckpt.config, f"checkpoint {checkpoint}", FIXED_BY_CHECKPOINT
    )
    fc: FinetuneConfig = config.finetune
    if fc.lora_r > 0 and fc.train_layers is not None:
        raise ModrmError("finetune: --lora and --train-layers both choose what trains; give one of them")
    group = Group.from_env(fc.device)
    stale = group.on_main(lambda: entries_to_replace(out, resume)) or []
    group.barrier()  # nobody looks into `out` before rank 0 has recovered it
    splits = load_split(data, ckpt)
    trained_on = ckpt.trained_on + [{"path": str(p), "sha256": file_sha256(p)} for p in data]
    identity = run_identity(ckpt, trained_on[len(ckpt.trained_on) :], config)
    if resume:
        read_state(out / SNAPSHOT_DIR, identity)  # another run's snapshot is refused before any work
    device = pick_device(group.device(fc.device))
    enc_cfg = dataclasses.replace(config.encoder, device=str(device), dtype=fc.weights_dtype)
    encoder = Encoder.load(enc_cfg, ckpt.encoder_info(enc_cfg))  # the run may trust remote code; a saved config never
    modules = ckpt.model.module_names
    train = tokenize_pairs(encoder, splits["train"], modules)
    val = tokenize_pairs(encoder, splits["val"], modules) if splits["val"] else None
    check_budget(train, fc.token_budget)

    torch.manual_seed(fc.seed)  # before LoRA: its initialisation is random (the same on every rank)
    prepare_encoder(encoder, fc)
    if group.distributed:  # each rank's own dropout draws, a function of the seed and the rank
        torch.manual_seed(int(np.random.SeedSequence([fc.seed, group.rank]).generate_state(1)[0]))
    model = EndToEnd(encoder, ckpt.model.to(device))
    trainer = group.wrap(model)  # DistributedDataParallel under torchrun; the model itself in one process
    frozen = frozen_blocks(encoder.model)
    # one plan for the global batch, identical on every rank; each rank runs its share of every window
    plans = [windows(plan_steps(train, fc.token_budget, fc.seed, epoch), fc.grad_accum) for epoch in range(fc.epochs)]
    if fc.max_steps:  # a short run: the first max_steps optimizer steps, validated at the end
        plans = cap_windows(plans, fc.max_steps)
    groups = param_groups(
        [(encoder.parameters(), fc.encoder_lr), (model.heads.parameters(), fc.heads_lr)], fc.weight_decay
    )
    total = sum(len(p) for p in plans)
    opt = Optimization(groups, total, device, fc.dtype, fc.betas, fc.warmup_ratio, fc.max_grad_norm, seed=fc.seed)
    if group.is_main and fc.grad_accum % group.world_size:
        print(
            f"note: finetune.grad_accum {fc.grad_accum} is not a multiple of the {group.world_size} processes: "
            "the micro-steps of an optimizer step are shared among them, so some sit out part of each (--grad-accum)",
            file=sys.stderr,
        )
    return Run(config, out, identity, stale, trained_on, group, device, model, trainer, frozen, opt, plans, train, val)


def entries_to_replace(out: Path, resume: bool) -> list[str]:
    """Rank 0, before anything is written: what a fresh run's first save removes from `out` (a folder that is not
    a checkpoint's is refused); with --resume, nothing, and the snapshot must be there."""
    stale = stale_entries(out)
    if not resume:
        return stale
    if SNAPSHOT_DIR not in stale:
        raise ModrmError(f"{out}: nothing to resume (no {SNAPSHOT_DIR}/ snapshot); run without --resume")
    return []


def run_identity(ckpt: Checkpoint, data: list[dict], config: Config) -> dict:
    """What names a run in its snapshots: the stage-0 checkpoint (its folder and heads), the data files (by
    content) and the settings, all but the devices (a run may resume on another machine)."""
    settings = {
        section: {k: v for k, v in values.items() if k != "device"} for section, values in config.to_dict().items()
    }
    return json.loads(
        json.dumps(
            {
                "checkpoint": str(ckpt.folder.resolve()),
                "heads_sha256": file_sha256(ckpt.folder / HEADS_FILE),
                "data_sha256": [d["sha256"] for d in data],
                "config": settings,
            }
        )
    )  # as the snapshot's JSON holds it (tuples as lists), so the two compare equal


def start(run: Run) -> Progress:
    """A fresh run: the stage-0 starting point validated and saved as epoch 0 (stage 1 never returns worse val
    loss than it), replacing whatever an older checkpoint had in `out`."""
    record = run.group.broadcast({"epoch": 0} | val_record(validate_end_to_end(run.model, run.val, run.config)))
    state = Progress(history=[record], steps=[])
    if run.group.is_main:
        save_stage1(run, state, remove=run.stale)
    return state


def train(run: Run, state: Progress, progress: bool) -> None:
    """The plan's optimizer steps from where `state` stands: a snapshot every `save_every` steps, and at each
    epoch's end a validation, the checkpoint when it is the best so far, and a snapshot."""
    fc, group = run.config.finetune, run.group
    reporter = Reporter(
        fc.report_to if group.is_main else [], run.out / RUNS_DIR, f"{run.out.name} (stage 1)", run.config.to_dict()
    )
    total = sum(len(p) for p in run.plans)
    bar = tqdm(
        total=total,
        initial=len(state.steps),
        desc="finetune",
        unit="step",
        disable=not progress or not group.is_main,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(state.epoch, len(run.plans)):
            train_mode(run.model, run.frozen)
            started = time.perf_counter()
            for w in range(state.window, len(run.plans[epoch])):
                window = run.plans[epoch][w]
                loss = window_gradients(run.trainer, run.train, window, run.n_modules, run.opt, group, run.config.heads)
                lrs = run.opt.lrs  # the rates this step uses (the scheduler moves on in opt.step)
                run.opt.step()
                pairs = int(sum(len(idx) for idx in window))
                state.steps.append(
                    {"step": len(state.steps) + 1, "epoch": epoch + 1, "loss": loss, "pairs": pairs, "lr": lrs}
                )
                reporter.log({"train/loss": loss, "train/lr": lrs[0]}, len(state.steps))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if len(state.steps) % fc.save_every == 0 and w + 1 < len(run.plans[epoch]):
                    save_snapshot(run, state)
            end_epoch(run, state, epoch + 1, time.perf_counter() - started, reporter)
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        where = f" on rank {group.rank}" if group.distributed else ""
        raise ModrmError(
            f"out of {'GPU' if run.device.type == 'cuda' else 'CPU'} memory{where} at finetune.token_budget "
            f"{fc.token_budget}: lower --token-budget, turn on gradient checkpointing, or train fewer layers "
            "(--train-layers K); --resume continues from the last snapshot"
        ) from None
    bar.close()
    reporter.close()
    if group.is_main:
        write_json(run.out / HISTORY_FILE, {"epochs": state.history, "steps": state.steps})
    group.barrier()  # every rank returns once the checkpoint and the history are complete


def end_epoch(run: Run, state: Progress, epoch: int, seconds: float, reporter: Reporter) -> None:
    """Validate (every rank, the whole val set; rank 0's record decides, so every rank decides alike), save the
    checkpoint if this epoch is the best so far, and snapshot."""
    val = validate_end_to_end(run.model, run.val, run.config)
    if val is not None:
        reporter.log_validation(val, len(state.steps))
    record = run.group.broadcast({"epoch": epoch, "seconds": seconds} | val_record(val))
    best = state.best
    state.history.append(record)
    if improves(record, best) and run.group.is_main:
        save_stage1(run, state)
    save_snapshot(run, state)


def window_gradients(
    trainer: nn.Module,
    data: TokenizedPairs,
    window: list[np.ndarray],
    n_modules: int,
    opt: Optimization,
    group: Group,
    heads: HeadConfig,
) -> float:
    """The gradients of one optimizer step, accumulated in the parameters: this rank's share of the window's
    micro-steps, each loss normalised by the pair counts of the whole window, so every pair weighs the same however
    the steps were packed or shared out. Returns the window's loss, summed over the ranks.

    Under DDP the gradients are all-reduced in the share's last backward (the others run under `no_sync`). DDP
    averages over the N ranks where the window needs a sum, so each loss counts N times. A rank whose share is
    empty (a window of fewer micro-steps than ranks) must still join that all-reduce: it runs the window's first
    micro-step with its loss counted 0 (zero gradients; the heads that step touches are used by the window anyway,
    so none of them gets a gradient that one process would leave None)."""
    counts = module_counts((data.module_idx[idx] for idx in window), n_modules)
    share = group.share(window)
    weight = float(group.world_size) if share else 0.0
    steps = share or window[:1]
    loss_sum = 0.0
    for k, idx in enumerate(steps):
        sync = k == len(steps) - 1 or not group.distributed
        with nullcontext() if sync else trainer.no_sync():
            with opt.autocast():
                r_pos, r_neg, module_idx = trainer(data, idx)
                loss = preference_loss(r_pos, r_neg, module_idx, n_modules, heads.alpha, heads.margin, counts)
            opt.backward(loss * weight)
        loss_sum += loss.item() if share else 0.0
    return group.sum(loss_sum)


def validate_end_to_end(model: EndToEnd, val: TokenizedPairs | None, config: Config) -> dict | None:
    """Embed the val texts with the current encoder, then the same validation as stage 0 (None: no val split)."""
    if val is None:
        return None
    tables = []
    with scoring(model):
        for tokens in (val.contexts, val.modules):
            table = torch.empty((len(tokens.ids), model.encoder.dim), device=model.encoder.device)
            for index, emb in model.encoder.encode_tokenized(tokens, progress=False):
                table[torch.from_numpy(index)] = torch.from_numpy(emb).to(table.device)
            tables.append(table)
    pairs = PairSet(torch.from_numpy(val.rows), torch.from_numpy(val.module_idx))
    return validate(model.heads, pairs, tables[0].__getitem__, tables[1].__getitem__, config.heads)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA raises its own error; the CPU allocator raises a RuntimeError that says it could not allocate."""
    return isinstance(err, torch.cuda.OutOfMemoryError | MemoryError) or "can't allocate memory" in str(err)


# ---------------------------------------------------------------------------------------------- saving


def save_stage1(run: Run, state: Progress, remove: list[str] | None = None) -> None:
    """encoder/ (save_pretrained, safetensors, tokenizer, pooling files) and the heads, as a stage-1 checkpoint,
    replaced together with `commit`; `remove`: what else goes in the same commit (an older checkpoint's files)."""
    model, names = run.model, [ENCODER_DIR, *HEADS_FILES]

    def write(staging: Path) -> None:
        hf_model = model.encoder.model
        if hasattr(hf_model, "merge_and_unload"):  # LoRA: save plain merged weights, from a copy (training goes on)
            hf_model = copy.deepcopy(hf_model).merge_and_unload()
        hf_model.save_pretrained(staging / ENCODER_DIR, safe_serialization=True)
        model.encoder.tokenizer.save_pretrained(staging / ENCODER_DIR)
        for name in ST_FILES:
            src = model.encoder.folder / name
            if src.is_dir():
                shutil.copytree(src, staging / ENCODER_DIR / name)
            elif src.is_file():
                shutil.copy2(src, staging / ENCODER_DIR / name)
        fingerprint = describe(run.config.encoder, folder=staging / ENCODER_DIR).fingerprint
        write_heads(staging, model.heads, run.config, fingerprint, 1, None, state.metrics(), run.trained_on)

    commit(run.out, names, write, remove=[n for n in remove or [] if n not in names])


# ---------------------------------------------------------------------------------------------- snapshots


SNAPSHOT_FORMAT = 3  # the run's identity in state.json, progress as epoch and step records, RNG in its own file
MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE = (
    "model.safetensors",
    "optimizer.safetensors",
    "rng.safetensors",
    "state.json",
)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG (dropout draws from it): torch's CPU generator and the current GPU's."""
    return {"torch_rng": torch.get_rng_state()} | (
        {"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    )


def rng_key(name: str, rank: int) -> str:
    """Rank 0's RNG under the names one process has always used, rank r's as `<name>.<r>`."""
    return name if rank == 0 else f"{name}.{rank}"


def save_snapshot(run: Run, state: Progress) -> None:
    """Everything needed to continue bit-for-bit: weights, AdamW moments, every rank's RNG, the progress (the
    schedule follows from it). Every rank takes part (the RNG states are gathered); rank 0 writes."""
    rngs = run.group.gather(rng_state())
    if not run.group.is_main:
        return

    def write(staging: Path) -> None:
        folder = staging / SNAPSHOT_DIR
        folder.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
        save_file(tensors, str(folder / MODEL_FILE))
        moments = run.opt.optimizer.state_dict()["state"]
        save_file(
            {f"{i}.{k}": v.cpu().contiguous() for i, s in moments.items() for k, v in s.items()},
            str(folder / OPTIMIZER_FILE),
        )
        save_file(
            {rng_key(k, rank): v for rank, rng in enumerate(rngs) for k, v in rng.items()}, str(folder / RNG_FILE)
        )
        meta = {"format": SNAPSHOT_FORMAT, "run": run.identity, "history": state.history, "steps": state.steps}
        (folder / STATE_FILE).write_text(json.dumps(meta | {"scaler": run.opt.scaler.state_dict()}))

    commit(run.out, [SNAPSHOT_DIR], write)


def load_snapshot(run: Run) -> Progress:
    """Restore the snapshot in `out` into the run: every file is read and checked against the run before anything
    is restored, and a damaged one is one error naming it. Each rank takes its own RNG state (a rank the snapshot
    has none for, when resuming on more processes than wrote it, keeps the RNG it was seeded with)."""
    folder = run.out / SNAPSHOT_DIR
    meta = read_state(folder, run.identity)
    state = read_progress(meta, folder / STATE_FILE, run.plans)
    weights = read_tensors(folder / MODEL_FILE, run.model.state_dict())
    moments = read_moments(folder / OPTIMIZER_FILE, run.opt)
    rngs = read_rng(folder / RNG_FILE, run.group.rank)
    scaler = read_scaler(meta, folder / STATE_FILE, run.opt)

    run.model.load_state_dict(weights)
    run.opt.optimizer.load_state_dict(
        {"state": moments, "param_groups": run.opt.optimizer.state_dict()["param_groups"]}
    )
    run.opt.fast_forward(len(state.steps))
    if scaler:
        run.opt.scaler.load_state_dict(scaler)
    if "torch_rng" in rngs:
        torch.set_rng_state(rngs["torch_rng"])
    if "cuda_rng" in rngs:
        torch.cuda.set_rng_state(rngs["cuda_rng"])
    run.group.barrier()  # every rank has read the snapshot before rank 0 may replace it
    return state


def damaged(path: Path, what: str) -> ModrmError:
    return ModrmError(f"{path}: a damaged snapshot ({what}); run without --resume to start afresh")


def read_state(folder: Path, identity: dict) -> dict:
    """state.json, refused if it is not JSON of the current format, or names another run."""
    path = folder / STATE_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise damaged(path, f"unreadable JSON: {err!s:.200}") from None
    if not isinstance(meta, dict):
        raise damaged(path, f"a {type(meta).__name__}, not an object")
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise ModrmError(f"{path}: a snapshot of another modrm version; run without --resume (into a new --out)")
    if not isinstance(meta.get("run"), dict):
        raise damaged(path, "no 'run' naming the run it belongs to")
    saved, now = flatten(meta.get("run")), flatten(identity)
    differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if differ:
        key = differ[0]
        raise ModrmError(
            f"{path}: the snapshot of another run ({key}: {saved.get(key)!r:.80} there, {now.get(key)!r:.80} now); "
            "run without --resume to start afresh, or give the settings of the run it belongs to"
        )
    return meta


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Nested objects as {"a.b.c": leaf}, so two of them compare key by key."""
    if not isinstance(value, dict):
        return {prefix.rstrip("."): value}
    return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}


def read_progress(meta: dict, path: Path, plans: list[list[list[np.ndarray]]]) -> Progress:
    """The history and step records, checked for what the loop relies on and against this run's step plan."""
    history, steps = meta.get("history"), meta.get("steps")
    if not (isinstance(history, list) and history and all(isinstance(r, dict) for r in history)):
        raise damaged(path, "'history' is not a list of epoch records")
    if not (isinstance(steps, list) and all(isinstance(s, dict) for s in steps)):
        raise damaged(path, "'steps' is not a list of step records")
    for i, record in enumerate(history):
        values = [record.get("val_loss"), record.get("val_accuracy")]
        if record.get("epoch") != i or not (values == [None, None] or all(map(is_number, values))):
            raise damaged(path, f"history[{i}] is not the record of epoch {i}")
    for i, step in enumerate(steps):
        if (
            step.get("step") != i + 1
            or step.get("epoch") not in range(1, len(plans) + 1)
            or not is_number(step.get("loss"))
        ):
            raise damaged(path, f"steps[{i}] is not the record of step {i + 1}")
    state = Progress(history, steps)
    done = sum(len(p) for p in plans[: state.epoch]) + state.window
    if (
        state.epoch > len(plans)
        or done != len(steps)
        or (state.epoch < len(plans) and state.window > len(plans[state.epoch]))
    ):
        raise damaged(path, f"{len(steps)} steps and {state.epoch} epochs do not fit this run's step plan")
    return state


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_tensors(path: Path, expected: Mapping[str, torch.Tensor], partial: bool = False) -> dict[str, torch.Tensor]:
    """A safetensors file whose tensors have the names (all of them; with `partial`, some), shapes and dtypes of
    `expected`; every shape is checked before a tensor is read."""
    with open_tensors(path) as f:
        names = set(f.keys())
        unknown, missing = names - expected.keys(), expected.keys() - names
        if unknown or (missing and not partial):
            raise damaged(path, f"{'unknown' if unknown else 'missing'} tensors {sorted(unknown or missing)[:3]}")
        return {name: checked_tensor(f, name, expected[name], path) for name in names}


def read_rng(path: Path, rank: int) -> dict[str, torch.Tensor]:
    """This rank's RNG states, by their plain names (the file holds those of every rank that wrote it); the CPU
    generator's is tried on a spare generator, which refuses a state that is not one."""
    with open_tensors(path) as f:
        names = set(f.keys())
        mine = {name: rng_key(name, rank) for name in rng_state()}
        rngs = {name: checked_tensor(f, key, rng_state()[name], path) for name, key in mine.items() if key in names}
    try:
        if "torch_rng" in rngs:
            torch.Generator().set_state(rngs["torch_rng"])
    except RuntimeError as err:
        raise damaged(path, f"torch_rng is not a generator state ({err})") from None
    return rngs


@contextmanager
def open_tensors(path: Path) -> Iterator:
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (OSError, SafetensorError) as err:
        raise damaged(path, f"not a readable safetensors file: {err!s:.200}") from None


def checked_tensor(f, name: str, like: torch.Tensor, path: Path) -> torch.Tensor:
    """Tensor `name`, refused unless it has the shape (checked before it is read) and dtype of `like`."""
    shape = tuple(f.get_slice(name).get_shape())
    if shape != tuple(like.shape):
        raise damaged(path, f"tensor {name} has shape {list(shape)}, not {list(like.shape)}")
    tensor = f.get_tensor(name)
    if tensor.dtype != like.dtype:
        raise damaged(path, f"tensor {name} is {tensor.dtype}, not {like.dtype}")
    return tensor


def read_moments(path: Path, opt: Optimization) -> dict[int, dict[str, torch.Tensor]]:
    """AdamW's per-parameter state: a step count and two moments of the parameter's shape, for any parameter that
    has had a gradient."""
    params = opt.params
    expected = {}
    for i, p in enumerate(params):
        expected |= {f"{i}.step": torch.empty((), dtype=torch.float32), f"{i}.exp_avg": p, f"{i}.exp_avg_sq": p}
    tensors = read_tensors(path, expected, partial=True)
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    incomplete = next((i for i, m in moments.items() if len(m) != 3), None)
    if incomplete is not None:
        raise damaged(path, f"parameter {incomplete} has {sorted(moments[incomplete])}, not step, exp_avg, exp_avg_sq")
    return moments


def read_scaler(meta: dict, path: Path, opt: Optimization) -> dict:
    """The fp16 grad scaler's state (empty when the scaler is off): its scale and growth count, checked."""
    current = opt.scaler.state_dict()
    if not current:
        return {}
    saved = meta.get("scaler")
    scale, tracker = (saved.get("scale"), saved.get("_growth_tracker")) if isinstance(saved, dict) else (None, None)
    if not (is_number(scale) and scale > 0 and isinstance(tracker, int) and tracker >= 0):
        raise damaged(path, "'scaler' needs a positive scale and a growth count")
    return current | {"scale": float(scale), "_growth_tracker": tracker}
