"""Every setting in one place: defaults here, overridden by a TOML file (`--config`), then by CLI flags.

The TOML file has one table per section below, e.g.

    [encoder]
    name = "sentence-transformers/all-MiniLM-L6-v2"
    max_context_tokens = 512
    [train]
    epochs = 30
"""

from __future__ import annotations

import dataclasses
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data import DEFAULT_MODULES
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
    context_template: str = "Task: {task}\n\n{context}"  # what the encoder sees as the trajectory context
    prompt_name: str | None = None  # a prompt from the model's config_sentence_transformers.json
    trust_remote_code: bool = False

    def context_text(self, task: str, context: str) -> str:
        return self.context_template.format(task=task, context=context)

    def context_head(self, task: str) -> str:
        """The part of a context before the trajectory: truncation keeps it, since quality depends on the task."""
        return self.context_template.format(task=task, context="\0").split("\0")[0]


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


@dataclass
class FinetuneConfig:
    """Stage 1: encoder and heads end to end."""

    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule is sized to them)
    encoder_lr: float = 1e-5
    heads_lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    token_budget: int = 8192  # padded tokens per step, all four texts of every pair counted
    gradient_checkpointing: str = "auto"  # auto (on when contexts may exceed 512 tokens) | on | off
    train_layers: int | None = None  # train only the top K encoder layers (None: all)
    lora_r: int = 0  # > 0: LoRA adapters of this rank instead of full encoder weights (needs peft)
    save_every: int = 50  # optimizer steps between resumable snapshots
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # autocast, as train.dtype; the weights stay fp32 (master weights)


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


def apply(config: Config, section: str, values: dict[str, Any]) -> None:
    target = getattr(config, section, None)
    if target is None or not dataclasses.is_dataclass(target):
        raise ModrmError(f"config: unknown section [{section}] (known: {', '.join(Config.__annotations__)})")
    known = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in known:
            raise ModrmError(f"config: unknown key {section}.{key} (known: {', '.join(sorted(known))})")
        setattr(target, key, _coerce(section, key, value, getattr(target, key)))
    if section == "encoder":
        check_template(config.encoder.context_template)


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults, then the TOML file, then CLI flags (None values are flags the user did not give)."""
    config = Config()
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModrmError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as err:
            raise ModrmError(f"{path}: malformed TOML ({err})") from None
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ModrmError(f"{path}: '{section}' must be a table like [{section}]")
            apply(config, section, values)
    for section, values in (overrides or {}).items():
        apply(config, section, {k: v for k, v in values.items() if v is not None})
    return config


def config_from_dict(raw: dict[str, Any]) -> Config:
    """The resolved config written beside an output, read back."""
    config = Config()
    for section, values in raw.items():
        apply(config, section, values)
    return config
