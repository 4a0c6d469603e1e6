"""Stage 1: reload the encoder and train encoder and heads end to end on the raw texts.

Starts from a stage-0 checkpoint (heads + LayerNorm) and the encoder its cache was built with. Steps are
filled to a token budget from length buckets (all four texts of each pair counted, padded); `grad_accum` steps
make one optimizer step, over which every pair weighs the same. Every `save_every` optimizer steps and at each
epoch's end a snapshot (weights, optimizer, scheduler, RNG; safetensors + JSON, no pickle) lets `--resume`
continue a killed run from that snapshot exactly as the uninterrupted run went on. Checkpoints and snapshots
are replaced with `commit`, so a kill at any instant leaves the old ones or the new ones, loadable.

Under torchrun (N processes, one per GPU, or gloo on CPU) encoder and heads run under DistributedDataParallel;
every rank makes the same step plan for the global batch and takes its contiguous share of each optimizer step's
micro-steps (`window_gradients`), so N processes take the optimizer steps one would. Rank 0 alone writes
checkpoints, snapshots, the history and the logs, and shows the progress bar.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pipeline.atomic import commit, recover, write_json
from pipeline.checkpoint import ENCODER_DIR, HEADS_FILES, Checkpoint, load_checkpoint, write_heads
from pipeline.config import FIXED_BY_CHECKPOINT, Config, FinetuneConfig, HeadConfig, resolve_config
from pipeline.data import Pair, assign_split, file_sha256, load_pairs
from pipeline.distributed import Group
from pipeline.encoder import Encoder, Tokenized, describe, pick_device
from pipeline.errors import ModrmError
from pipeline.heads import preference_loss
from pipeline.reporting import Reporter
from pipeline.train_heads import PairSet, validate
from pipeline.training import Optimization, module_counts, param_groups, windows

ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling")
SNAPSHOT_DIR = "resume"


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

    def __init__(self, encoder: Encoder, heads: nn.Module):
        super().__init__()
        self.encoder, self.heads = encoder, heads

    def embed(self, tokens: Tokenized, index: np.ndarray) -> torch.Tensor:
        return self.encoder(self.encoder.collate([tokens.ids[i] for i in index]))

    def forward(self, data: TokenizedPairs, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = data.rows[idx]
        ctx = self.embed(data.contexts, np.concatenate([rows[:, 0], rows[:, 2]]))
        mod = self.embed(data.modules, np.concatenate([rows[:, 1], rows[:, 3]]))
        module_idx = torch.from_numpy(data.module_idx[idx])
        rewards = self.heads(ctx, mod, torch.cat([module_idx, module_idx]))  # indices on the host: no device sync
        return rewards[: len(idx)], rewards[len(idx) :], module_idx.to(ctx.device)


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


# ---------------------------------------------------------------------------------------------- snapshots


SNAPSHOT_FORMAT = 2  # progress counted in optimizer steps (windows); older snapshots are refused


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG (dropout draws from it): torch's CPU generator and the current GPU's."""
    return {"torch_rng": torch.get_rng_state()} | (
        {"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    )


def rng_key(name: str, rank: int) -> str:
    """Rank 0's RNG under the names one process has always used, rank r's as `<name>.<r>`."""
    return name if rank == 0 else f"{name}.{rank}"


def save_snapshot(
    out: Path, model: EndToEnd, opt: Optimization, progress: dict, rngs: list[dict] | None = None
) -> None:
    """Everything needed to continue bit-for-bit: weights, AdamW moments, schedule, RNG, position. `rngs`: every
    rank's `rng_state()`, in rank order (default: this process's alone)."""

    def write(staging: Path) -> None:
        folder = staging / SNAPSHOT_DIR
        folder.mkdir()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors")
        )
        state = opt.optimizer.state_dict()
        tensors = {f"{i}.{k}": v.cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()}
        for rank, rng in enumerate(rngs or [rng_state()]):
            tensors |= {rng_key(name, rank): value for name, value in rng.items()}
        save_file(tensors, str(folder / "optimizer.safetensors"))
        meta = {
            "param_groups": state["param_groups"],
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "progress": progress | {"format": SNAPSHOT_FORMAT},
        }
        (folder / "state.json").write_text(json.dumps(meta))

    commit(out, [SNAPSHOT_DIR], write)


def load_snapshot(folder: Path, model: EndToEnd, opt: Optimization, rank: int = 0) -> dict:
    """Restore a snapshot; `rank` takes its own RNG state (a rank the snapshot has none for, when resuming on
    more processes than wrote it, keeps the RNG it was seeded with)."""
    state = json.loads((folder / "state.json").read_text())
    if state["progress"].get("format") != SNAPSHOT_FORMAT:
        raise ModrmError(f"{folder}: a snapshot of an older modrm; run without --resume (into a new --out)")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    rngs = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(("torch_rng", "cuda_rng"))]}
    if rng_key("torch_rng", rank) in rngs:
        torch.set_rng_state(rngs[rng_key("torch_rng", rank)])
    cuda_rng = rngs.get(rng_key("cuda_rng", rank))
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    opt.optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    opt.scheduler.load_state_dict(state["scheduler"])
    opt.scaler.load_state_dict(state["scaler"])
    return state["progress"]


# ---------------------------------------------------------------------------------------------- saving


def save_stage1(
    out: Path, model: EndToEnd, config: Config, source: Path, metrics: dict, trained_on: list[dict]
) -> None:
    """encoder/ (save_pretrained, safetensors, tokenizer, pooling files) and the heads, as a stage-1 checkpoint,
    replaced together with `commit`."""

    def write(staging: Path) -> None:
        hf_model = model.encoder.model
        if hasattr(hf_model, "merge_and_unload"):  # LoRA: save plain merged weights, from a copy (training goes on)
            hf_model = copy.deepcopy(hf_model).merge_and_unload()
        hf_model.save_pretrained(staging / ENCODER_DIR, safe_serialization=True)
        model.encoder.tokenizer.save_pretrained(staging / ENCODER_DIR)
        for name in ST_FILES:
            src = source / name
            if src.is_dir():
                shutil.copytree(src, staging / ENCODER_DIR / name)
            elif src.is_file():
                shutil.copy2(src, staging / ENCODER_DIR / name)
        fingerprint = describe(config.encoder, folder=staging / ENCODER_DIR).fingerprint
        write_heads(staging, model.heads, config, fingerprint, 1, None, metrics, trained_on)

    commit(out, [ENCODER_DIR, *HEADS_FILES], write)


# ---------------------------------------------------------------------------------------------- training


def load_split(paths: list[Path], ckpt: Checkpoint) -> dict[str, list[Pair]]:
    pairs = load_pairs(paths, modules=[])
    ckpt.check_modules(pairs, paths[0])
    d = ckpt.config.data
    split = {"train": [], "val": []}
    for pair in pairs:
        split.setdefault(assign_split(pair.split_key, d.train_fraction, d.val_fraction, d.split_seed), []).append(pair)
    for name in ("train", "val"):
        if not split[name]:
            raise ModrmError(f"{paths[0]}: no {name} pairs under the checkpoint's split by task")
    return split


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


def finetune(
    checkpoint: str | Path,
    data: list[Path],
    out: str | Path,
    overrides: Mapping[str, Mapping] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """`modrm finetune`: returns the best epoch's validation metrics; writes a stage-1 checkpoint to `out`.

    `overrides` are config sections ({"finetune": {"epochs": 2}, ...}) over the checkpoint's own config; what
    the checkpoint fixes (encoder, split, head sizes) may not change. Under torchrun every rank calls it with
    the same arguments and gets the same result; `out` must be on a filesystem every rank sees."""
    ckpt = load_checkpoint(checkpoint)
    layers = [("the given settings", overrides or {})]
    config = resolve_config(layers, ckpt.config, f"checkpoint {checkpoint}", FIXED_BY_CHECKPOINT)
    fc: FinetuneConfig = config.finetune
    if fc.lora_r > 0 and fc.train_layers is not None:
        raise ModrmError("finetune: --lora and --train-layers both choose what trains; give one of them")
    group = Group.from_env(fc.device)
    out = Path(out)
    if group.is_main and out.is_dir():
        recover(out)  # a save a kill interrupted: finished if it had committed, else dropped
    group.barrier()  # nobody looks into `out` before rank 0 has recovered it
    snapshot = out / SNAPSHOT_DIR
    if resume and not group.broadcast(snapshot.is_dir()):
        raise ModrmError(f"{out}: nothing to resume (no {SNAPSHOT_DIR}/ snapshot); run without --resume")
    splits = load_split(data, ckpt)
    trained_on = ckpt.trained_on + [{"path": str(p), "sha256": file_sha256(p)} for p in data]
    device = pick_device(group.device(fc.device))
    enc_cfg = dataclasses.replace(config.encoder, device=str(device), dtype="float32")  # fp32 master weights
    encoder = Encoder.load(enc_cfg, ckpt.encoder_info())
    modules = ckpt.model.module_names
    train = tokenize_pairs(encoder, splits["train"], modules)
    val = tokenize_pairs(encoder, splits["val"], modules)
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
    opt = Optimization(groups, total, device, fc.dtype, fc.betas, fc.warmup_ratio, fc.max_grad_norm)
    if group.is_main and fc.grad_accum % group.world_size:
        print(
            f"note: finetune.grad_accum {fc.grad_accum} is not a multiple of the {group.world_size} processes: "
            "the micro-steps of an optimizer step are shared among them, so some sit out part of each (--grad-accum)",
            file=sys.stderr,
        )

    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        state = load_snapshot(snapshot, model, opt, group.rank)
        group.barrier()  # every rank has read the snapshot before rank 0 may replace it
    else:  # the stage-0 starting point is a candidate too: stage 1 never returns worse val loss than it
        record = group.broadcast(epoch_record(0, validate_end_to_end(model, val, config)))
        state = {"epoch": 0, "window": 0, "optimizer_steps": 0, "best": record, "history": [record], "steps": []}
        if group.is_main:
            save_stage1(out, model, config, encoder.folder, history_metrics(state), trained_on)
    reporter = Reporter(fc.report_to if group.is_main else [], out / "runs", f"{out.name} (stage 1)", config.to_dict())
    bar = tqdm(
        total=total,
        initial=state["optimizer_steps"],
        desc="finetune",
        unit="step",
        disable=not progress or not group.is_main,
        dynamic_ncols=True,
    )

    def snapshot_all_ranks() -> None:
        rngs = group.gather(rng_state())
        if group.is_main:
            save_snapshot(out, model, opt, state, rngs)

    try:
        for epoch in range(state["epoch"], len(plans)):
            train_mode(model, frozen)
            start = time.perf_counter()
            for w in range(state["window"], len(plans[epoch])):
                window = plans[epoch][w]
                window_loss = window_gradients(trainer, train, window, len(modules), opt, group, config.heads)
                lrs = opt.lrs  # the rates this step uses (the scheduler moves on in opt.step)
                opt.step()
                state["optimizer_steps"] += 1
                state["window"] = w + 1
                state["steps"].append(
                    {
                        "step": state["optimizer_steps"],
                        "epoch": epoch + 1,
                        "loss": window_loss,
                        "pairs": int(sum(len(idx) for idx in window)),
                        "lr": lrs,
                    }
                )
                reporter.log({"train/loss": window_loss, "train/lr": lrs[0]}, state["optimizer_steps"])
                bar.update(1)
                bar.set_postfix(loss=f"{window_loss:.4f}")
                if state["optimizer_steps"] % fc.save_every == 0 and w + 1 < len(plans[epoch]):
                    snapshot_all_ranks()
            # every rank validates the whole val set; rank 0's record decides, so every rank decides alike
            val_metrics = validate_end_to_end(model, val, config)
            reporter.log_validation(val_metrics, state["optimizer_steps"])
            record = group.broadcast(epoch_record(epoch + 1, val_metrics, time.perf_counter() - start))
            state["history"].append(record)
            state["epoch"], state["window"] = epoch + 1, 0
            if record["val_loss"] < state["best"]["val_loss"]:
                state["best"] = record
                if group.is_main:
                    save_stage1(out, model, config, encoder.folder, history_metrics(state), trained_on)
            snapshot_all_ranks()
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        where = f" on rank {group.rank}" if group.distributed else ""
        raise ModrmError(
            f"out of {'GPU' if device.type == 'cuda' else 'CPU'} memory{where} at finetune.token_budget "
            f"{fc.token_budget}: lower --token-budget, turn on gradient checkpointing, or train fewer layers "
            "(--train-layers K); --resume continues from the last snapshot"
        ) from None
    bar.close()
    reporter.close()
    if group.is_main:
        write_json(out / "finetune_history.json", {"epochs": state["history"], "steps": state["steps"]})
    group.barrier()  # every rank returns once the checkpoint and the history are complete
    return {
        "best": state["best"],
        "history": state["history"],
        "steps": state["steps"],
        "n_train": len(train.module_idx),
        "n_val": len(val.module_idx),
    }


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


def epoch_record(epoch: int, val: dict, seconds: float | None = None) -> dict:
    return {"epoch": epoch, **({"seconds": seconds} if seconds is not None else {})} | {
        f"val_{k}": val[k] for k in ("loss", "accuracy", "modules")
    }


def history_metrics(state: dict) -> dict:
    """metrics.json of a stage-1 checkpoint: the best epoch and the curves so far."""
    return {"best": state["best"], "history": state["history"], "steps": state["steps"]}


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA raises its own error; the CPU allocator raises a RuntimeError that says it could not allocate."""
    return isinstance(err, torch.cuda.OutOfMemoryError | MemoryError) or "can't allocate memory" in str(err)


@torch.inference_mode()
def validate_end_to_end(model: EndToEnd, val: TokenizedPairs, config: Config) -> dict:
    """Embed the val texts with the current encoder, then the same validation as stage 0."""
    model.eval()
    embed = {}
    for role, tokens in (("context", val.contexts), ("module", val.modules)):
        table = torch.empty((len(tokens.ids), model.encoder.dim), device=model.encoder.device)
        for index, emb in model.encoder.encode_tokenized(tokens, progress=False):
            table[torch.from_numpy(index)] = torch.from_numpy(emb).to(table.device)
        embed[role] = table
    offset = len(val.contexts.ids)  # one table: contexts first, then module texts
    table = torch.cat([embed["context"], embed["module"]])
    rows = torch.from_numpy(val.rows + np.array([0, offset, 0, offset]))
    return validate(model.heads, table, PairSet(rows, torch.from_numpy(val.module_idx)), config)
