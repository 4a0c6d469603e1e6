"""Stage 1: reload the encoder and train encoder and heads end to end on the raw texts.

Starts from a stage-0 checkpoint (heads + LayerNorm) and the encoder its cache was built with. Steps are
filled to a token budget (all four texts of each pair counted, padded), and every `save_every` optimizer
steps and at each epoch's end a snapshot (weights, optimizer, scheduler, RNG; safetensors + JSON, no pickle)
lets `--resume` continue a killed run from that snapshot exactly as the uninterrupted run went on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pipeline.atomic import write_json
from pipeline.checkpoint import ENCODER_DIR, Checkpoint, load_checkpoint, save_heads
from pipeline.config import FIXED_BY_CHECKPOINT, Config, FinetuneConfig, resolve_config
from pipeline.data import Pair, load_pairs, task_split
from pipeline.embed import pair_texts
from pipeline.encoder import Encoder, Tokenized, describe, pick_device
from pipeline.errors import ModrmError
from pipeline.heads import preference_loss
from pipeline.train_heads import PairSet, autocast_dtype, validate, warmup_then_linear

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
    columns = pair_texts(pairs, encoder.config)
    heads = [encoder.config.context_head(p.task) for p in pairs]
    rows = np.empty((len(pairs), 4), dtype=np.int64)
    tokenized = {}
    for role, (a, b) in {"context": ("pos_ctx_row", "neg_ctx_row"), "module": ("pos_mod_row", "neg_mod_row")}.items():
        unique = dict(zip(columns[a] + columns[b], heads + heads, strict=True))  # text -> its head, first seen order
        row_of = {t: i for i, t in enumerate(unique)}
        rows[:, 0 if role == "context" else 1] = [row_of[t] for t in columns[a]]
        rows[:, 2 if role == "context" else 3] = [row_of[t] for t in columns[b]]
        tokenized[role] = encoder.tokenize(list(unique), role, heads=list(unique.values()))
    lookup = {m: i for i, m in enumerate(modules)}
    module_idx = np.array([lookup[p.target_module] for p in pairs], dtype=np.int64)
    return TokenizedPairs(tokenized["context"], tokenized["module"], rows, module_idx)


def plan_steps(data: TokenizedPairs, budget: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled pairs, cut greedily into steps that fit the token budget (deterministic per seed and epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(data.module_idx))
    steps, current = [], []
    for i in order:
        if current and data.cost(np.array([*current, i])) > budget:
            steps.append(np.array(current))
            current = []
        current.append(i)
    if current:
        steps.append(np.array(current))
    return steps


def cap_steps(plans: list[list[np.ndarray]], n_steps: int) -> list[list[np.ndarray]]:
    capped = []
    for steps in plans:
        if n_steps <= 0:
            break
        capped.append(steps[:n_steps])
        n_steps -= len(steps)
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
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModrmError("--lora needs peft: pip install 'modrm[lora]'") from None
    encoder.model = get_peft_model(encoder.model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))


# ---------------------------------------------------------------------------------------------- snapshots


def save_snapshot(folder: Path, model: EndToEnd, optimizer, scheduler, scaler, progress: dict) -> None:
    """Everything needed to continue bit-for-bit: weights, AdamW moments, schedule, RNG, position."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    tensors["torch_rng"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(
        json.dumps(
            {
                "param_groups": opt["param_groups"],
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "progress": progress,
            }
        )
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_snapshot(folder: Path, model: EndToEnd, optimizer, scheduler, scaler) -> dict:
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    torch.set_rng_state(tensors.pop("torch_rng"))
    cuda_rng = tensors.pop("cuda_rng", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return state["progress"]


# ---------------------------------------------------------------------------------------------- saving


def save_stage1(out: Path, model: EndToEnd, ckpt: Checkpoint, config: Config, source: Path, metrics: dict) -> None:
    """encoder/ (save_pretrained, safetensors, tokenizer, pooling files) and the heads, as a stage-1 checkpoint."""
    encoder = model.encoder
    tmp = out / (ENCODER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model = encoder.model
    if hasattr(hf_model, "merge_and_unload"):  # LoRA: save plain merged weights, from a copy (training goes on)
        hf_model = copy.deepcopy(hf_model).merge_and_unload()
    hf_model.save_pretrained(tmp, safe_serialization=True)
    encoder.tokenizer.save_pretrained(tmp)
    for name in ST_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.is_file():
            shutil.copy2(src, tmp / name)
    shutil.rmtree(out / ENCODER_DIR, ignore_errors=True)
    tmp.rename(out / ENCODER_DIR)
    fingerprint = describe(config.encoder, folder=out / ENCODER_DIR).fingerprint
    save_heads(out, model.heads, config, fingerprint, stage=1, cache=None, metrics=metrics)


# ---------------------------------------------------------------------------------------------- training


def load_split(paths: list[Path], ckpt: Checkpoint) -> dict[str, list[Pair]]:
    pairs = load_pairs(paths, modules=[])
    ckpt.check_modules(pairs, paths[0])
    d = ckpt.config.data
    split = {"train": [], "val": []}
    for pair in pairs:
        split.setdefault(task_split(pair.task, d.train_fraction, d.val_fraction, d.split_seed), []).append(pair)
    for name in ("train", "val"):
        if not split[name]:
            raise ModrmError(f"{paths[0]}: no {name} pairs under the checkpoint's split by task")
    return split


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
    the checkpoint fixes (encoder, split, head sizes) may not change."""
    ckpt = load_checkpoint(checkpoint)
    layers = [("the given settings", overrides or {})]
    config = resolve_config(layers, ckpt.config, f"checkpoint {checkpoint}", FIXED_BY_CHECKPOINT)
    fc: FinetuneConfig = config.finetune
    out = Path(out)
    snapshot = out / SNAPSHOT_DIR
    if resume and not snapshot.is_dir():
        raise ModrmError(f"{out}: nothing to resume (no {SNAPSHOT_DIR}/ snapshot); run without --resume")
    splits = load_split(data, ckpt)
    device = pick_device(fc.device)
    enc_cfg = dataclasses.replace(config.encoder, device=str(device), dtype="float32")  # fp32 master weights
    encoder = Encoder.load(enc_cfg, ckpt.encoder_info())
    modules = ckpt.model.module_names
    train = tokenize_pairs(encoder, splits["train"], modules)
    val = tokenize_pairs(encoder, splits["val"], modules)
    check_budget(train, fc.token_budget)

    if fc.lora_r > 0:
        add_lora(encoder, fc.lora_r)
    elif fc.train_layers is not None:
        freeze_layers(encoder.model, fc.train_layers)
    checkpointing = fc.gradient_checkpointing == "on" or (
        fc.gradient_checkpointing == "auto" and encoder.fingerprint.max_context_tokens > 512
    )
    if checkpointing:
        enable_checkpointing(encoder.model)
    model = EndToEnd(encoder, ckpt.model.to(device))
    torch.manual_seed(fc.seed)
    groups = [
        {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": fc.encoder_lr},
        {"params": list(model.heads.parameters()), "lr": fc.heads_lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=fc.weight_decay)
    plans = [plan_steps(train, fc.token_budget, fc.seed, epoch) for epoch in range(fc.epochs)]
    if fc.max_steps:  # a short run: the first max_steps optimizer steps, validated at the end
        plans = cap_steps(plans, fc.max_steps * fc.grad_accum)
    total = sum(math.ceil(len(p) / fc.grad_accum) for p in plans)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(total, fc.warmup_ratio))
    autocast = autocast_dtype(fc.dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)

    out.mkdir(parents=True, exist_ok=True)
    if resume:
        state = load_snapshot(snapshot, model, optimizer, scheduler, scaler)
    else:  # the stage-0 starting point is a candidate too: stage 1 never returns worse val loss than it
        start = validate_end_to_end(model, val, config)
        record = {
            "epoch": 0,
            "val_loss": start["loss"],
            "val_accuracy": start["accuracy"],
            "val_modules": start["modules"],
        }
        state = {"epoch": 0, "step": 0, "optimizer_steps": 0, "best": record, "history": [record]}
        save_stage1(out, model, ckpt, config, encoder.folder, {"best": record, "history": state["history"]})
    bar = tqdm(
        total=sum(len(p) for p in plans),
        initial=sum(len(p) for p in plans[: state["epoch"]]) + state["step"],
        desc="finetune",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(state["epoch"], len(plans)):
            model.train()
            steps = plans[epoch]
            start = time.perf_counter()
            for step in range(state["step"], len(steps)):
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    r_pos, r_neg, module_idx = model(train, steps[step])
                    loss = preference_loss(
                        r_pos, r_neg, module_idx, len(modules), config.heads.alpha, config.heads.margin
                    )
                scaler.scale(loss / fc.grad_accum).backward()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if (step + 1) % fc.grad_accum and step + 1 != len(steps):
                    continue
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], fc.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["optimizer_steps"] += 1
                state["step"] = step + 1
                if state["optimizer_steps"] % fc.save_every == 0 and step + 1 < len(steps):
                    save_snapshot(snapshot, model, optimizer, scheduler, scaler, state)
            val_metrics = validate_end_to_end(model, val, config)
            record = {
                "epoch": epoch + 1,
                "seconds": time.perf_counter() - start,
                "val_loss": val_metrics["loss"],
                "val_accuracy": val_metrics["accuracy"],
                "val_modules": val_metrics["modules"],
            }
            state["history"].append(record)
            state["epoch"], state["step"] = epoch + 1, 0
            if record["val_loss"] < state["best"]["val_loss"]:
                state["best"] = record
                save_stage1(out, model, ckpt, config, encoder.folder, {"best": record, "history": state["history"]})
            save_snapshot(snapshot, model, optimizer, scheduler, scaler, state)
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        raise ModrmError(
            f"out of {'GPU' if device.type == 'cuda' else 'CPU'} memory at finetune.token_budget "
            f"{fc.token_budget}: lower --token-budget, turn on gradient checkpointing, or train fewer layers "
            "(--train-layers K); --resume continues from the last snapshot"
        ) from None
    bar.close()
    write_json(out / "finetune_history.json", state["history"])
    return {
        "best": state["best"],
        "history": state["history"],
        "n_train": len(train.module_idx),
        "n_val": len(val.module_idx),
    }


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
