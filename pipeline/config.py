"""Every setting in one place: defaults here, overridden by a TOML file (`--config`), then by CLI flags.

The TOML file has one table per section below, e.g.

    [encoder]
    name = "sentence-transformers/all-MiniLM-L6-v2"
    max_context_tokens = 512
    [train]
    epochs = 30
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data import DEFAULT_MODULES

if TYPE_CHECKING:
    from pipeline.data import Pair
from pipeline.errors import ModrmError


@dataclass
class EncoderConfig:
    name: str = "Qwen/Qwen3-Embedding-0.6B"  # Hugging Face id or local folder
    revision: str | None = None  # hub revision (branch, tag or commit); None: the default branch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    max_context_tokens: int = 2048  # contexts keep their head (prompt, task) and their most recent tokens
    max_module_tokens: int = 512  # module texts keep their first tokens
    token_budget: int | None = None  # padded tokens per encoder batch; None: 4096 on CPU (cache-sized), 32768 on CUDA
    packing: str = "auto"  # a batch's texts end to end, no padding: auto (on a GPU) | on | off
    context_template: str = "Task: {task}\n\n{context}"  # what the encoder sees as the trajectory context
    prompt_name: str | None = None  # a prompt from the model's config_sentence_transformers.json
    trust_remote_code: bool = False
    use_safetensors: bool = True  # false: also load pickled *.bin weights (they can run code; trusted folders only)

    def context_text(self, task: str, context: str) -> str:
        return self.context_template.format(task=task, context=context)

    def context_head(self, task: str) -> str:
        """The part of a context before the trajectory: truncation keeps it, since quality depends on the task."""
        return self.context_template.format(task=task, context="\0").split("\0")[0]

    def pair_texts(self, pair: Pair) -> tuple[str, str, str, str]:
        """A pair's four texts as the encoder sees them: positive context, positive module text, negative
        context, negative module text (the contexts start with the task)."""
        return (
            self.context_text(pair.task, pair.positive.context),
            pair.positive.module_text,
            self.context_text(pair.task, pair.negative.context),
            pair.negative.module_text,
        )


@dataclass
class DataConfig:
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES))  # empty: any module name
    train_fraction: float = 0.8
    val_fraction: float = 0.1
    split_seed: int = 0


@dataclass
class HeadConfig:
    hidden: int = 2048
    hidden2: int = 1024
    dropout: float = 0.1
    alpha: float = 0.1  # weight of the margin term of the loss
    margin: float = 0.1


@dataclass
class TrainConfig:
    """Stage 0: heads on cached embeddings."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    patience: int = 5  # epochs without a better val loss before stopping
    seed: int = 0
    memory_budget_gb: float = 4.0  # embeddings larger than this are memory-mapped, not loaded
    device: str = "auto"
    dtype: str = "auto"  # autocast: auto (bf16 on CUDA where supported, else fp16 + grad scaler; fp32 on CPU)
    report_to: list[str] = field(default_factory=list)  # stream training numbers: "tensorboard", "wandb"


@dataclass
class FinetuneConfig:
    """Stage 1: encoder and heads end to end."""

    epochs: int = 4  # measured: off-task held-out pairs gained +0.069 at 4, +0.031 at 2 (README, "Stage 1 defaults")
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule is sized to them)
    encoder_lr: float = 1e-4  # measured: 1e-5 (the seed's) moved nothing on held-out wording; 1e-4 did
    heads_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    token_budget: int = 8192  # padded tokens per step, all four texts of every pair counted
    gradient_checkpointing: str = "auto"  # auto (on when contexts may exceed 512 tokens) | on | off
    train_layers: int | None = None  # train only the top K encoder layers (None: all)
    lora_r: int = 0  # > 0: LoRA adapters of this rank instead of full encoder weights (needs peft)
    encoder_dropout: float | None = None  # dropout in the trained encoder blocks; None: the model's own
    save_every: int = 50  # optimizer steps between resumable snapshots
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # autocast, as train.dtype
    # the encoder's weights, gradients and AdamW moments: float32 (16 bytes a parameter) | bfloat16 (8 bytes, each
    # update rounded stochastically: pipeline/bf16_adamw.py); the heads stay float32
    weights_dtype: str = "float32"
    report_to: list[str] = field(default_factory=list)  # as train.report_to


@dataclass
class Config:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """TOML gives lists where tuples are wanted and ints where floats are; anything else is a user error."""
    if isinstance(default, tuple):
        value = tuple(value) if isinstance(value, list) else value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if default is not None and not isinstance(value, type(default)):
        raise ModrmError(f"config {section}.{key}: expected {type(default).__name__}, got {value!r}")
    return value


def check_template(template: str) -> None:
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if fields.count("context") != 1 or set(fields) - {"task", "context"}:
        raise ModrmError(
            f"config encoder.context_template {template!r}: needs {{context}} once and no field but {{task}}"
        )


# (low, high, low included, high included); None: unbounded. Integers where the default is an integer.
_AT_LEAST_1, _AT_LEAST_0, _ABOVE_0 = (1, None, True, True), (0, None, True, True), (0, None, False, True)
_FRACTION, _BELOW_1 = (0, 1, True, True), (0, 1, True, False)
RANGES: dict[tuple[str, str], tuple] = {
    **{("encoder", k): _AT_LEAST_1 for k in ("max_context_tokens", "max_module_tokens", "token_budget")},
    ("data", "train_fraction"): _FRACTION,
    ("data", "val_fraction"): _FRACTION,
    ("heads", "hidden"): _AT_LEAST_1,
    ("heads", "hidden2"): _AT_LEAST_1,
    ("heads", "dropout"): _BELOW_1,
    ("heads", "alpha"): _AT_LEAST_0,
    ("heads", "margin"): _AT_LEAST_0,
    **{("train", k): _AT_LEAST_1 for k in ("epochs", "batch_size", "grad_accum", "patience")},
    **{("train", k): _ABOVE_0 for k in ("lr", "max_grad_norm", "memory_budget_gb")},
    ("train", "weight_decay"): _AT_LEAST_0,
    ("train", "warmup_ratio"): _BELOW_1,
    **{("finetune", k): _AT_LEAST_1 for k in ("epochs", "max_steps", "grad_accum", "token_budget", "save_every")},
    **{("finetune", k): _AT_LEAST_0 for k in ("encoder_lr", "heads_lr", "weight_decay", "train_layers", "lora_r")},
    ("finetune", "max_grad_norm"): _ABOVE_0,
    ("finetune", "warmup_ratio"): _BELOW_1,
    ("finetune", "encoder_dropout"): _BELOW_1,
}
CHOICES = {
    "dtype": ("auto", "float32", "float16", "bfloat16"),
    "gradient_checkpointing": ("auto", "on", "off"),
    "packing": ("auto", "on", "off"),
    "weights_dtype": ("float32", "bfloat16"),
}
INTEGERS = {("encoder", "token_budget"), ("finetune", "max_steps"), ("finetune", "train_layers")}  # default None
FLOATS = {("finetune", "encoder_dropout")}  # default None


def check_value(section: str, key: str, value: Any) -> None:
    """Ranges and choices, so a setting that cannot work is refused where it is read, naming it."""
    name = f"config {section}.{key}"
    if value is None:
        return
    if key == "device" and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value)):
        raise ModrmError(f"{name}: {value!r} is not a device (auto, cpu, cuda or cuda:N)")
    if key in CHOICES and value not in CHOICES[key]:
        raise ModrmError(f"{name}: {value!r} is not one of {', '.join(CHOICES[key])}")
    if (section, key) in INTEGERS and (isinstance(value, bool) or not isinstance(value, int)):
        raise ModrmError(f"{name}: expected an integer, got {value!r}")
    if (section, key) in FLOATS and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ModrmError(f"{name}: expected a number, got {value!r}")
    if (section, key) in RANGES:
        low, high, low_in, high_in = RANGES[section, key]
        if (
            not math.isfinite(value)
            or (low is not None and (value < low or (value == low and not low_in)))
            or (high is not None and (value > high or (value == high and not high_in)))
        ):
            bounds = [f"{'>=' if low_in else '>'} {low}" if low is not None else ""]
            bounds += [f"{'<=' if high_in else '<'} {high}" if high is not None else ""]
            raise ModrmError(f"{name}: {value!r} is out of range (needs {' and '.join(b for b in bounds if b)})")
    if key == "betas" and not (len(value) == 2 and all(isinstance(b, float | int) and 0 <= b < 1 for b in value)):
        raise ModrmError(f"{name}: {value!r} must be two numbers in [0, 1)")


def apply(config: Config, section: str, values: dict[str, Any]) -> None:
    target = getattr(config, section, None)
    if target is None or not dataclasses.is_dataclass(target):
        raise ModrmError(f"config: unknown section [{section}] (known: {', '.join(Config.__annotations__)})")
    known = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in known:
            raise ModrmError(f"config: unknown key {section}.{key} (known: {', '.join(sorted(known))})")
        value = _coerce(section, key, value, getattr(target, key))
        check_value(section, key, value)
        setattr(target, key, value)
    if section == "encoder":
        check_template(config.encoder.context_template)
    if section == "data" and config.data.train_fraction + config.data.val_fraction > 1:
        raise ModrmError("config data.train_fraction + data.val_fraction: above 1, leaving no room for a split")


# What a cache or checkpoint fixes: a file or flag may repeat these, never change them.
ENCODER_IDENTITY = (
    "name",
    "revision",
    "max_context_tokens",
    "max_module_tokens",
    "context_template",
    "prompt_name",
)
SPLIT = ("modules", "train_fraction", "val_fraction", "split_seed")
FIXED_BY_CACHE = {"encoder": ENCODER_IDENTITY, "data": SPLIT}
FIXED_BY_CHECKPOINT = {**FIXED_BY_CACHE, "heads": ("hidden", "hidden2")}
# Settings that let a model folder run code (its own Python files; pickled weights), at their safe values: a config
# saved with a cache or checkpoint may come from anywhere, so reading one always restores these; only the settings
# of the run itself (a --config file, the caller's own Config) turn them on.
CODE_SETTINGS = {"trust_remote_code": False, "use_safetensors": True}
# Where a run happened is not part of what it made: never inherited from a saved config.
RUN_SETTINGS = {
    "encoder": ("device", "dtype", "token_budget", "packing"),
    "train": ("device",),
    "finetune": ("device",),
}


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModrmError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ModrmError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as err:
        raise ModrmError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ModrmError(f"{path}: malformed TOML ({err})") from None
    return raw


def resolve_config(
    layers: Sequence[tuple[str, Mapping[str, Any]]],
    saved: Config | None = None,
    saved_by: str = "",
    fixed: Mapping[str, Sequence[str]] | None = None,
) -> Config:
    """The one precedence rule of every command: built-in defaults < the config saved with the cache or
    checkpoint it reads (`saved`, less its run settings) < each layer in order (a --config file, then flags).
    A field the saved config fixes may be repeated with its value, never changed: that is an error naming
    the layer, the field and both values."""
    config = copy.deepcopy(saved) if saved is not None else Config()
    for section, keys in RUN_SETTINGS.items():
        for key in keys:
            setattr(getattr(config, section), key, getattr(getattr(Config(), section), key))
    for source, sections in layers:
        for section, values in sections.items():
            if not isinstance(values, Mapping):
                raise ModrmError(f"{source}: '{section}' must be a table like [{section}]")
            apply(config, section, {k: v for k, v in values.items() if v is not None})
        for section, keys in (fixed or {}).items() if saved is not None else ():
            for key in keys:
                now, before = getattr(getattr(config, section), key), getattr(getattr(saved, section), key)
                if now != before:
                    raise ModrmError(
                        f"{source}: {section}.{key} = {now!r}, but {saved_by} was made with {before!r}; "
                        "it cannot change there (leave it out, or make a new one)"
                    )
    return config


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    saved: Config | None = None,
    saved_by: str = "",
    fixed: Mapping[str, Sequence[str]] | None = None,
) -> Config:
    """`resolve_config` over a TOML file and command-line flags (None values are flags the user did not give)."""
    layers = [(str(path), read_toml(path))] if path is not None else []
    return resolve_config([*layers, ("the command line", overrides or {})], saved, saved_by, fixed)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """The resolved config written beside an output, read back (`source` names the file in errors), with the
    settings that would let a model folder run code at their safe values (`CODE_SETTINGS`)."""
    config = Config()
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ModrmError(f"{source}: the saved config is not a table of sections")
    try:
        for section, values in raw.items():
            apply(config, section, values)
    except ModrmError as err:
        raise ModrmError(f"{source}: {err}") from None
    for key, safe in CODE_SETTINGS.items():
        setattr(config.encoder, key, safe)
    return config
