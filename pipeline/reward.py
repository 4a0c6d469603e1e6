"""Rewards for RL loops: a trained checkpoint as one Python object that scores raw agent trajectories.

    rm = RewardModel.load("artifacts/stage1")      # stage 0 or 1; the encoder checked by fingerprint
    rm.score([{"task": t, "trajectory": traj}])     # [{"planner": 1.7, "memory": None, ...}]
    rm.reward(items, weights={"planner": 2.0})      # [weighted mean of the modules each item has]
    rm.as_reward_function()                         # TRL's reward_funcs: (prompts, completions, **kw) -> [float]

A trajectory is split into module views by the tag parser; every unique text of a call is encoded once, in
token-budget batches, and an LRU of recent embeddings keeps texts repeated across calls (a GRPO group shares its
task, and often most module outputs) from being encoded again. `modrm score` and `modrm serve` score through
`head_rewards`; training and eval score whole pairs through `pipeline.pairwise.side_rewards`.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import text_key
from pipeline.checkpoint import Checkpoint, load_checkpoint
from pipeline.encoder import Encoder
from pipeline.errors import ModrmError
from pipeline.heads import RewardHeads
from pipeline.trajectory import module_views

DEFAULT_CACHE_SIZE = 32768  # embeddings kept: 128 MiB at 1024 dimensions
HEADS_BATCH = 8192  # rows per forward pass of the heads


@dataclass
class Stats:
    """Counters since load: what the cache saved, what the encoder did."""

    calls: int = 0
    items: int = 0
    texts: int = 0  # unique texts asked for, call by call
    cache_hits: int = 0
    encoded: int = 0
    tokens: int = 0  # tokens encoded


class EmbeddingLRU:
    """The most recent embeddings by text key (pipeline.cache.text_key: role and sha256 of the text): keys stay small
    however long the text."""

    def __init__(self, size: int):
        if size < 0:
            raise ModrmError(f"cache size {size}: must be 0 (off) or more")
        self.size = size
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def get(self, key: bytes) -> np.ndarray | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: bytes, value: np.ndarray) -> None:
        if self.size:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def check_items(items: Sequence[Mapping], source: str = "items") -> None:
    """Each item a mapping with string `task` and `trajectory`; the first problem names the item and field."""
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise ModrmError(f"{source}: expected a list of {{task, trajectory}} objects, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ModrmError(f"{source}: item {i}: expected an object with task and trajectory")
        for field in ("task", "trajectory"):
            if not isinstance(item.get(field), str):
                raise ModrmError(f"{source}: item {i}, field '{field}': missing or not a string")
            check_text(item[field], f"{source}: item {i}, field '{field}'")


def check_text(text: str, where: str) -> None:
    """Text the tokenizer can take: a lone surrogate (JSON's "\\ud800") is a str without a UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ModrmError(f"{where}: not valid Unicode (a lone surrogate at character {err.start})") from None


def message_text(value: object, what: str) -> str:
    """A prompt or completion as text: a string as it is; chat messages (TRL's conversational format) as
    their contents joined by newlines, a content that is a list of parts by its text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, Sequence):
        texts = []
        for message in value:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, Sequence) and not isinstance(content, str):
                content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            if not isinstance(content, str):
                raise ModrmError(f"{what}: a chat message needs a string 'content' (got {message!r:.80})")
            texts.append(content)
        return "\n".join(texts)
    raise ModrmError(f"{what}: expected a string or a list of chat messages, got {type(value).__name__}")


@torch.inference_mode()
def head_rewards(heads: RewardHeads, ctx: np.ndarray, mod: np.ndarray, module_idx: np.ndarray) -> np.ndarray:
    """The one place the heads score: rows of (context embedding, module-text embedding, module index) -> float32
    rewards, in batches on the heads' device, dropout off (the heads' train/eval mode is restored after)."""
    device = next(heads.parameters()).device
    out = np.empty(len(module_idx), dtype=np.float32)
    was_training = heads.training
    heads.eval()
    try:
        for lo in range(0, len(module_idx), HEADS_BATCH):
            hi = lo + HEADS_BATCH
            rows = heads(
                torch.from_numpy(np.asarray(ctx[lo:hi], dtype=np.float32)).to(device),
                torch.from_numpy(np.asarray(mod[lo:hi], dtype=np.float32)).to(device),
                torch.from_numpy(np.asarray(module_idx[lo:hi], dtype=np.int64)),
            )
            out[lo:hi] = rows.float().cpu().numpy()
    finally:
        heads.train(was_training)
    return out


def weighted_mean(rewards: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """The weighted mean over the modules present (None where none with a weight is)."""
    total = sum(weights[m] for m, r in rewards.items() if r is not None and weights[m])
    if not total:
        return None
    return sum(weights[m] * r for m, r in rewards.items() if r is not None and weights[m]) / total


class RewardModel:
    """A checkpoint's heads and encoder, scoring trajectories; thread-safe (one call runs the model at a time)."""

    def __init__(self, checkpoint: Checkpoint, encoder: Encoder, cache_size: int = DEFAULT_CACHE_SIZE):
        module_views("", checkpoint.model.module_names)  # every module needs a tag mapping: fail at load, not later
        self.checkpoint, self.encoder, self.heads = checkpoint, encoder, checkpoint.model
        self.cache = EmbeddingLRU(cache_size)
        self.stats = Stats()
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        device: str = "auto",
        cache_size: int = DEFAULT_CACHE_SIZE,
        compile: bool = False,
        trust_remote_code: bool = False,
    ) -> RewardModel:
        """A stage-0 or stage-1 checkpoint on `device` (auto | cpu | cuda[:N]), with the encoder its heads were
        trained on (a different one, by fingerprint, is an error naming what differs). `compile`: the encoder
        under torch.compile, compiled here (see `Encoder.compile`). `trust_remote_code`: let the encoder folder's
        own Python files run (only for folders you trust; a checkpoint's saved config never turns it on)."""
        ckpt = load_checkpoint(checkpoint, trust_remote_code=trust_remote_code)
        ckpt.run_on(device)
        encoder = Encoder.load(ckpt.config.encoder, ckpt.encoder_info())
        if compile:
            encoder.compile()
        return cls(ckpt, encoder, cache_size)

    def swapped_to(self, folder: str | Path) -> RewardModel:
        """`folder`'s checkpoint ready to serve in this one's place, on its device: with this one's encoder, embedding
        LRU and counters where the encoders are the same by fingerprint (a refreshed version, a reloaded stage 0),
        else with its own encoder. The modules must be the same: a server's weights and statistics are by module."""
        ckpt = load_checkpoint(folder, trust_remote_code=self.checkpoint.config.encoder.trust_remote_code)
        if ckpt.model.module_names != self.modules:
            raise ModrmError(
                f"checkpoint {folder}: modules {', '.join(ckpt.model.module_names)} differ from the served ones "
                f"({', '.join(self.modules)})"
            )
        ckpt.run_on(self.checkpoint.config.encoder.device)
        if ckpt.fingerprint.differences(self.checkpoint.fingerprint):
            encoder = Encoder.load(ckpt.config.encoder, ckpt.encoder_info())
            if self.encoder.compiled:
                encoder.compile()
            swapped = RewardModel(ckpt, encoder, self.cache.size)
        else:
            swapped = RewardModel(ckpt, self.encoder, self.cache.size)
            swapped.cache = self.cache
        swapped.stats = self.stats
        return swapped

    @property
    def modules(self) -> list[str]:
        return list(self.heads.module_names)

    # ------------------------------------------------------------------------------------------ the model

    def embed(
        self, texts: Sequence[str], role: str, heads: Sequence[str] | None = None, progress: bool = False
    ) -> np.ndarray:
        """float32 embeddings of unique `texts`: from the LRU where it has them, the rest encoded in one pass."""
        keys = [text_key(role, t) for t in texts]
        out = np.empty((len(texts), self.encoder.dim), dtype=np.float32)
        missing = []
        for i, key in enumerate(keys):
            found = self.cache.get(key)
            if found is None:
                missing.append(i)
            else:
                out[i] = found
        self.stats.texts += len(texts)
        self.stats.cache_hits += len(texts) - len(missing)
        if missing:
            todo_heads = [heads[i] for i in missing] if heads else None
            tokens = self.encoder.tokenize([texts[i] for i in missing], role, todo_heads)
            for index, emb in self.encoder.encode_tokenized(tokens, desc=f"embed {role}s", progress=progress):
                out[np.asarray(missing)[index]] = emb
            for i in missing:
                self.cache.put(keys[i], out[i].copy())
            self.stats.encoded += len(missing)
            self.stats.tokens += int(tokens.lengths.sum())
        return out

    # ------------------------------------------------------------------------------------------ scoring

    def score(self, items: Sequence[Mapping[str, str]], progress: bool = False) -> list[dict[str, float | None]]:
        """One dict per item, every module: its reward, or None where the trajectory has no text for it."""
        check_items(items)
        modules, enc = self.modules, self.checkpoint.config.encoder
        contexts = [enc.context_text(item["task"], item["trajectory"]) for item in items]
        context_heads = dict(zip(contexts, (enc.context_head(item["task"]) for item in items), strict=True))
        views = [module_views(item["trajectory"], modules) for item in items]
        module_texts = list(dict.fromkeys(v for row in views for v in row.values() if v))
        ctx_row = {t: i for i, t in enumerate(context_heads)}
        mod_row = {t: i for i, t in enumerate(module_texts)}
        # each unique (context, view, module) is scored once: duplicate trajectories get bit-identical rewards
        slots: dict[tuple[int, int, int], int] = {}
        for context, row in zip(contexts, views, strict=True):
            for m, module in enumerate(modules):
                if row[module]:
                    slots.setdefault((ctx_row[context], mod_row[row[module]], m), len(slots))
        values: list[float] = []
        with self._lock:
            self.stats.calls += 1
            self.stats.items += len(items)
            if slots:
                ctx_emb = self.embed(list(context_heads), "context", list(context_heads.values()), progress)
                mod_emb = self.embed(module_texts, "module", progress=progress)
                c, v, m = (np.array(column) for column in zip(*slots, strict=True))
                values = head_rewards(self.heads, ctx_emb[c], mod_emb[v], m).tolist()
        return [
            {
                module: values[slots[(ctx_row[context], mod_row[row[module]], m)]] if row[module] else None
                for m, module in enumerate(modules)
            }
            for context, row in zip(contexts, views, strict=True)
        ]

    def check_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        """Every module's weight (default 1, an unnamed one 0); unknown modules, weights below 0 or not finite, all
        weights 0, and weights whose sum overflows a float (the mean would be wrong) are errors."""
        if weights is None:
            return dict.fromkeys(self.modules, 1.0)
        unknown = sorted(set(weights) - set(self.modules))
        if unknown:
            raise ModrmError(f"weights: unknown module(s) {', '.join(unknown)} (modules: {', '.join(self.modules)})")
        resolved = {m: weights.get(m, 0.0) for m in self.modules}
        for module, w in resolved.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= sys.float_info.max:
                raise ModrmError(f"weights: {module}={w!r:.40} must be a finite number >= 0")
        if not any(resolved.values()):
            raise ModrmError("weights: at least one module needs a weight above 0")
        if not math.isfinite(sum(map(float, resolved.values()))):
            raise ModrmError("weights: their sum overflows a float; use smaller weights (only their ratios matter)")
        return resolved

    def reward(
        self, items: Sequence[Mapping[str, str]], weights: Mapping[str, float] | None = None
    ) -> list[float | None]:
        """One reward per item: the weighted mean of its modules' rewards (default: equal weights), modules the
        trajectory lacks left out; None for an item with no weighted module at all."""
        resolved = self.check_weights(weights)
        return [weighted_mean(rewards, resolved) for rewards in self.score(items)]

    def as_reward_function(
        self, module: str | None = None, weights: Mapping[str, float] | None = None
    ) -> Callable[..., list[float | None]]:
        """A function with TRL's `reward_funcs` signature, `(prompts, completions, **kwargs) -> list[float]`: the
        prompt is the task, the completion the trajectory (plain strings or chat messages). With `module`, that
        module's reward alone; else `reward` with `weights`. None where nothing is scored (TRL skips it)."""
        if module is not None and module not in self.modules:
            raise ModrmError(f"module {module!r}: the checkpoint's modules are {', '.join(self.modules)}")
        if module is not None and weights is not None:
            raise ModrmError("as_reward_function: give a module or weights, not both")
        resolved = self.check_weights(weights)

        def reward_function(prompts: Sequence, completions: Sequence, **kwargs) -> list[float | None]:
            if len(prompts) != len(completions):
                raise ModrmError(f"{len(prompts)} prompts but {len(completions)} completions")
            items = [
                {"task": message_text(p, f"prompt {i}"), "trajectory": message_text(c, f"completion {i}")}
                for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
            ]
            scores = self.score(items)
            if module is not None:
                return [s[module] for s in scores]
            return [weighted_mean(s, resolved) for s in scores]

        reward_function.__name__ = reward_function.__qualname__ = f"modrm_{module or 'reward'}"
        return reward_function
