"""A reward server that learns: `modrm serve --checkpoint DIR --learn STATE_DIR`.

Pairs arrive by `POST /pairs` (the seed's format) or are mined from `POST /rollouts` (the `modrm pairs` format);
each request is kept only once its pairs are durably in STATE_DIR. A refresh starts when `refresh_pairs` new pairs
have arrived, or `refresh_seconds` have passed with some:

    embed    the new texts, with the server's own encoder, into STATE_DIR/cache/: a small chunk at a time through the
             model thread at the learner's priority, so a scoring batch always runs before the next chunk
    train    in a niced child process with one torch thread (`python -m pipeline.learner JOB`): heads starting from
             the served ones, on the pairs gathered so far (train split by group) with as many of the checkpoint's
             own training pairs replayed (from its training cache, or `--replay CACHE`), so old skills stay
    judge    the new heads against the served ones on the checkpoint's own val split, and on the new pairs held
             out by group: served only when not worse on the former by more than `max_regression`; a refused
             version stays on disk, and the log says why
    swap     between two batches in the model thread: a batch is scored by one version, never a mix

STATE_DIR:
    pairs/000001.jsonl   one request's pairs (seed format), written to a temporary file, fsynced, renamed
    cache/<encoder>/     the embedding cache of their texts, one per encoder (an ordinary `modrm embed` cache)
    versions/v0001/      one ordinary checkpoint per refresh (`modrm eval`/`modrm score` read it), never reusing an
                         older one's folder, with version.json: time, pairs seen, val metrics, accepted or refused
    served.json          the version served, rewritten at every swap: a restart serves it again

The pairs of a refused refresh are left out of later ones (they stay in pairs/). Versions are named `v<N>`; the
checkpoint given by --checkpoint is `base-<first 12 hex digits of its heads' sha256>`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import fcntl
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from pipeline.atomic import atomic_write, commit, write_json
from pipeline.cache import Cache, Shard, as_keys, text_key
from pipeline.checkpoint import HEADS_FILES, METRICS_FILE, Checkpoint, load_checkpoint, write_heads
from pipeline.config import Config
from pipeline.data import DataError, Pair, Problem, load_pairs, pair_to_record
from pipeline.encoder import Tokenized
from pipeline.errors import ModrmError
from pipeline.heads import RewardHeads
from pipeline.mine import MineOptions, mine_rollouts
from pipeline.pairwise import PairSet, split_by_group, validate
from pipeline.reward import EmbeddingLRU
from pipeline.rollouts import RolloutFormat
from pipeline.train_heads import EPOCH_LOG, Run, split_sets, train
from pipeline.training import Optimization, param_groups

log = logging.getLogger("modrm.learn")

VERSION_FILE, SERVED_FILE = "version.json", "served.json"
VERSION_NAME = re.compile(r"v(\d{4,})")
EMBED_CHUNK = 2  # texts encoded per model-thread call while a refresh embeds: a scoring batch waits at most one
LRU_CHUNK = 64  # texts taken from the server's LRU per model-thread call
SHARD_TEXTS = 512  # texts per cache shard written while a refresh embeds (a kill loses at most these)
MIN_REPLAY = 256  # replayed pairs at least, however few the new ones
STEPS_PER_EPOCH = 8  # at least, by smaller batches where the pairs are few: a refresh of a few pairs still moves
MIN_BATCH = 16
PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass(frozen=True)
class LearnConfig:
    state_dir: Path
    refresh_pairs: int = 1000  # new pairs that start a refresh
    refresh_seconds: float = 600.0  # or this long after new pairs arrived
    max_regression: float = 0.02  # accuracy on the checkpoint's own val split a new version may lose
    replay: Path | None = None  # the cache of the checkpoint's training pairs; None: the one its config records
    epochs: int = 5  # at most, from the served heads (early stopping on val loss as stage 0)


# ---------------------------------------------------------------------------------------------- intake


def lock_state(folder: Path) -> TextIO:
    """The one server's flock on STATE_DIR/.lock, held while it lives (never stale: a dead process holds none)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / ".lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ModrmError(f"--learn {folder}: another modrm serve learns into it; give each server its own") from None
    return handle


def fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def body_problem(err: DataError, where: str) -> str:
    """A reader's first problem, naming the request instead of the temporary file it was read from."""
    first = err.problems[0]
    more = len(err.problems) - 1
    return str(Problem(where, first.record, first.field, first.message)) + (f" (+{more} more problems)" if more else "")


def read_pairs_body(body: bytes, modules: Sequence[str], where: str) -> list[Pair]:
    """The pairs of a request body (a JSON list or JSON lines), read by the one pairs reader; a problem is one
    line naming `where`, the record and the field."""
    with tempfile.TemporaryDirectory(prefix="modrm-pairs-") as tmp:
        path = Path(tmp) / "body.json"
        path.write_bytes(body)
        try:
            return load_pairs([path], modules)
        except DataError as err:
            raise ModrmError(body_problem(err, where)) from None


def mine_rollouts_body(body: bytes, modules: Sequence[str], strategy: str, where: str) -> tuple[list[Pair], list[str]]:
    """The pairs mined from a request body of rollouts (`modrm pairs`' format and miner), with the miner's summary."""
    with tempfile.TemporaryDirectory(prefix="modrm-rollouts-") as tmp:
        path, out = Path(tmp) / "body.json", Path(tmp) / "pairs.jsonl"
        path.write_bytes(body)
        try:
            summary = mine_rollouts([path], out, MineOptions(strategy=strategy), RolloutFormat(), progress=False)
        except ModrmError as err:
            raise ModrmError(str(err).replace(str(path), where)) from None
        mined = load_pairs([out], []) if sum(summary.pairs.values()) else []
    kept = [p for p in mined if p.target_module in modules]
    headless = sorted({p.target_module for p in mined} - set(modules))
    lines = summary.lines()
    if headless:
        lines.append(f"left out {len(mined) - len(kept)} pairs of module(s) without a head: {', '.join(headless)}")
    return kept, lines


class Inbox:
    """The pairs received, one file per request in arrival order; pair_ids unique over them all."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".*.tmp-*"):  # a write a kill interrupted: never acknowledged
            leftover.unlink()
        self.counts: dict[int, int] = {}
        self.owner: dict[str, str] = {}
        for path in sorted(folder.glob("*.jsonl")):
            pairs = load_pairs([path], [])
            self.counts[int(path.stem)] = len(pairs)
            self.owner |= {p.pair_id: path.name for p in pairs}
        self.lock = threading.Lock()

    def path(self, number: int) -> Path:
        return self.folder / f"{number:06d}.jsonl"

    def next_number(self) -> int:
        return max(self.counts, default=0) + 1

    def add(self, pairs: Sequence[Pair], where: str, numbered: bool = False) -> int:
        """Keep `pairs` durably (fsynced file, atomic rename, fsynced folder); returns their file's number.
        `numbered`: each pair_id prefixed with that number (mined ids repeat from one request to the next)."""
        with self.lock:
            if numbered:
                pairs = [dataclasses.replace(p, pair_id=f"{self.next_number():06d}/{p.pair_id}") for p in pairs]
            for pair in pairs:
                if pair.pair_id in self.owner:
                    raise ModrmError(
                        f"{where}: pair_id {pair.pair_id!r}, field 'pair_id': already received (in "
                        f"{self.owner[pair.pair_id]}); give new pairs new ids"
                    )
            number = self.next_number()
            lines = "".join(json.dumps(pair_to_record(p)) + "\n" for p in pairs)
            atomic_write(self.path(number), lambda tmp: tmp.write_text(lines, encoding="utf-8"))
            fsync_folder(self.folder)
            self.counts[number] = len(pairs)
            self.owner |= {p.pair_id: self.path(number).name for p in pairs}
            return number

    def pairs(self, numbers: Sequence[int]) -> list[Pair]:
        return load_pairs([self.path(n) for n in numbers], []) if numbers else []


# ---------------------------------------------------------------------------------------------- versions


@dataclass
class Version:
    name: str  # v<N>
    folder: Path
    record: dict  # its version.json

    @property
    def accepted(self) -> bool:
        return self.record.get("status") == "accepted"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Versions:
    """The versions in STATE_DIR/versions (those with a verdict; a folder a kill left without one is removed)."""

    def __init__(self, state_dir: Path):
        self.folder = state_dir / "versions"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.served_file = state_dir / SERVED_FILE
        self.known: dict[str, Version] = {}
        for path in sorted(self.folder.iterdir()):
            if not VERSION_NAME.fullmatch(path.name):
                continue
            if not (path / VERSION_FILE).is_file():
                shutil.rmtree(path)  # a refresh killed before its verdict
                continue
            self.known[path.name] = Version(path.name, path, json.loads((path / VERSION_FILE).read_text()))

    def new_folder(self) -> Path:
        numbers = [
            int(VERSION_NAME.fullmatch(p.name)[1]) for p in self.folder.iterdir() if VERSION_NAME.fullmatch(p.name)
        ]
        return self.folder / f"v{max(numbers, default=0) + 1:04d}"

    def judged(self, folder: Path, record: dict) -> Version:
        write_json(folder / VERSION_FILE, record)
        version = Version(folder.name, folder, record)
        self.known[version.name] = version
        return version

    def served_name(self) -> str | None:
        try:
            return json.loads(self.served_file.read_text())["version"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def mark_served(self, name: str) -> None:
        write_json(self.served_file, {"version": name, "time": now()})


# ---------------------------------------------------------------------------------------------- the learner


@dataclass
class Served:
    """What the server scores with now: the version's name and folder, and the model (RewardModel)."""

    name: str
    folder: Path
    rm: object


class Learner:
    """Takes pairs in, refreshes the heads in its own thread, judges and swaps them in.

    `serving()` gives the Served now; `encode(fn, *args)` runs fn in the model thread at the learner's priority
    and waits for it; `install(folder, name)` loads a checkpoint folder and swaps it in between batches;
    `counted(result)` hears each refresh's result (accepted, refused, failed)."""

    def __init__(
        self,
        config: LearnConfig,
        base: Path,
        serving: Callable[[], Served],
        encode: Callable,
        install: Callable[[Path, str], None],
        counted: Callable[[str], None] = lambda result: None,
    ):
        self.config, self.base = config, base
        self.serving, self.encode, self.install, self.counted = serving, encode, install, counted
        self.replay = self._replay_cache()
        self.lock = lock_state(config.state_dir)
        self.inbox = Inbox(config.state_dir / "pairs")
        self.versions = Versions(config.state_dir)
        self.wake = threading.Condition()
        self.pending_since: float | None = time.monotonic() if self.pending() else None
        self.stopping = False

    def _replay_cache(self) -> Path:
        """The cache of the checkpoint's training pairs: --replay, else the one its config records (stage 0)."""
        if self.config.replay is not None:
            return self.config.replay
        ckpt = load_checkpoint(self.base)
        if ckpt.cache is None or not Path(ckpt.cache, "manifest.json").is_file():
            raise ModrmError(
                f"--learn: checkpoint {self.base} records no training cache that exists here ({ckpt.cache}); pass "
                "--replay CACHE, a cache of its training pairs embedded with its encoder, to replay and validate on"
            )
        return Path(ckpt.cache)

    def start_version(self) -> str | None:
        """The version a restart serves (None: the checkpoint itself)."""
        name = self.versions.served_name()
        return name if name in self.versions.known else None

    # ------------------------------------------------------------------------------------------ intake

    def receive(self, pairs: Sequence[Pair], where: str, numbered: bool = False) -> int:
        self.inbox.add(pairs, where, numbered)
        with self.wake:
            if self.pending_since is None:
                self.pending_since = time.monotonic()
            self.wake.notify()
        return len(pairs)

    def trained_numbers(self) -> set[int]:
        """Inbox files some refresh has already taken (accepted or refused)."""
        return {n for v in self.versions.known.values() for n in v.record.get("new_files", [])}

    def pending(self) -> list[int]:
        taken = self.trained_numbers()
        return [n for n in sorted(self.inbox.counts) if n not in taken]

    def pending_pairs(self) -> int:
        return sum(self.inbox.counts[n] for n in self.pending())

    # ------------------------------------------------------------------------------------------ the thread

    def start(self) -> None:
        threading.Thread(target=self._loop, name="modrm-learner", daemon=True).start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def _due(self) -> float | None:
        """0 when a refresh is due, else seconds until one may be (None: no pairs wait)."""
        if self.pending_since is None:
            return None
        if self.pending_pairs() >= self.config.refresh_pairs:
            return 0.0
        return max(0.0, self.pending_since + self.config.refresh_seconds - time.monotonic())

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and (wait := self._due()) != 0.0:
                    self.wake.wait(wait)
                if self.stopping:
                    return
                self.pending_since = None
            try:
                self.refresh()
            except Exception:
                self.counted("failed")
                log.exception("refresh failed; the served heads stay")

    # ------------------------------------------------------------------------------------------ a refresh

    def refresh(self) -> Version | None:
        """Train a version on the pairs gathered so far (those of the served version's lineage and the new ones),
        judge it, and swap it in if accepted."""
        new = self.pending()
        if not new:
            return None
        served = self.serving()
        parent = self.versions.known.get(served.name)
        files = sorted({*(parent.record["pair_files"] if parent is not None else []), *new})
        folder, record = self._train(served, files)
        accepted, reason = self.verdict(record["val"])
        if accepted and self.serving().name != served.name:
            accepted, reason = False, f"the served heads changed during the refresh (now {self.serving().name})"
        record |= {"new_files": new, "status": "accepted" if accepted else "refused", "reason": reason}
        version = self.versions.judged(folder, record)
        if not accepted:
            self.counted("refused")
            log.warning("version %s refused: %s", folder.name, reason)
            return version
        self.install(folder, folder.name)
        self.counted("accepted")
        seconds = record["seconds"]["total"]
        log.info("version %s serves: %s (%.1f s, %d pairs)", folder.name, reason, seconds, record["pairs_seen"])
        return version

    def _train(self, served: Served, files: list[int]) -> tuple[Path, dict]:
        """Embed the pairs of `files`, train a version from the served heads in the child: its folder and record."""
        started = time.perf_counter()
        pairs = self.inbox.pairs(files)
        cache = self.config.state_dir / "cache" / served.rm.checkpoint.fingerprint.weights_sha256[:12]  # by encoder
        encoded, from_lru = embed_pairs(pairs, cache, served.rm, self.encode)
        embedded = time.perf_counter()
        folder = self.versions.new_folder()
        job = {
            "start": str(served.folder),
            "replay": str(self.replay),
            "cache": str(cache),
            "files": [str(self.inbox.path(n)) for n in files],
            "out": str(folder),
            "epochs": self.config.epochs,
        }
        train_in_child(job)
        record = {
            "version": folder.name,
            "time": now(),
            "parent": served.name,
            "pairs_seen": len(pairs),
            "pair_files": files,
            "texts_encoded": encoded,
            "texts_from_lru": from_lru,
            "seconds": {"embed": round(embedded - started, 2), "total": round(time.perf_counter() - started, 2)},
            "val": json.loads((folder / METRICS_FILE).read_text())["val"],
        }
        return folder, record

    def verdict(self, val: dict) -> tuple[bool, str]:
        """Served only when not worse on the checkpoint's own val split by more than max_regression."""
        original = val["original"]
        before, after = original["served_accuracy"], original["accuracy"]
        new = val.get("new")
        on_new = f"; held-out new pairs {new['served_accuracy']:.3f} -> {new['accuracy']:.3f}" if new else ""
        said = f"accuracy on the checkpoint's val split {before:.3f} -> {after:.3f}{on_new}"
        if after < before - self.config.max_regression:
            return False, f"{said}: worse by more than --max-regression {self.config.max_regression:g}"
        return True, said

    # ------------------------------------------------------------------------------------------ versions

    def listing(self, base_name: str) -> list[dict]:
        served = self.serving().name
        rows = [{"version": base_name, "status": "base", "served": served == base_name}]
        for name, version in sorted(self.versions.known.items()):
            record = {k: v for k, v in version.record.items() if k not in ("pair_files", "new_files")}
            rows.append(record | {"served": served == name})
        return rows

    def rollback(self, name: str, base_name: str) -> Path:
        """The folder of version `name` to serve again: an accepted version, or the checkpoint itself."""
        if name == base_name:
            return self.base
        version = self.versions.known.get(name)
        if version is None:
            known = ", ".join([base_name, *sorted(self.versions.known)])
            raise ModrmError(f"'version': no version {name!r} (versions: {known})")
        if not version.accepted:
            raise ModrmError(f"'version': {name} was refused ({version.record.get('reason')}); it is never served")
        return version.folder


# ---------------------------------------------------------------------------------------------- embedding


PAIR_ROLES = ("context", "module", "context", "module")


def embed_pairs(pairs: Sequence[Pair], cache_dir: Path, rm, encode: Callable) -> tuple[int, int]:
    """The texts of `pairs` the cache lacks, committed to the cache: those the server's LRU holds (rollouts the policy
    had scored) taken from it, the rest encoded by `rm`'s encoder; a few at a time through `encode` (the model
    thread, at the learner's priority). Returns how many were encoded and how many came from the LRU."""
    config = rm.checkpoint.config.encoder
    wanted: dict[str, dict[bytes, tuple[str, str]]] = {"context": {}, "module": {}}  # role: key -> (text, head)
    for pair in pairs:
        head = config.context_head(pair.task)
        for role, text in zip(PAIR_ROLES, config.pair_texts(pair), strict=True):
            wanted[role].setdefault(text_key(role, text), (text, head if role == "context" else ""))
    encoded = from_lru = 0
    with Cache.open(cache_dir, rm.checkpoint.fingerprint) as cache:
        order = []
        for role, texts in wanted.items():
            keys = list(texts)
            missing = [
                k for k, row in zip(keys, cache.find(as_keys(b"".join(keys))) if keys else [], strict=True) if row < 0
            ]
            for lo in range(0, len(missing), SHARD_TEXTS):  # one shard file per SHARD_TEXTS, not per call
                part = missing[lo : lo + SHARD_TEXTS]
                calls = [
                    encode(encode_texts, rm, role, [(k, *texts[k]) for k in call])
                    for call in model_calls(part, rm.cache)
                ]
                lengths, truncated, embeddings, held = zip(*calls, strict=True)
                cache.add_shard(Shard(as_keys(b"".join(part)), *map(np.concatenate, (lengths, truncated, embeddings))))
                from_lru += sum(held)
                encoded += len(part) - sum(held)
            order += missing
        if order:
            cache.commit(as_keys(b"".join(order)))
    return encoded, from_lru


def model_calls(keys: list[bytes], lru: EmbeddingLRU) -> list[list[bytes]]:
    """`keys` in order, cut into model-thread calls of at most EMBED_CHUNK texts to encode (a scoring batch waits for
    one call at most) and LRU_CHUNK texts the LRU holds (those cost a lookup and their tokenization)."""
    calls: list[list[bytes]] = []
    fresh = held = 0
    for key in keys:
        in_lru = key in lru
        if not calls or fresh + (not in_lru) > EMBED_CHUNK or held + in_lru > LRU_CHUNK:
            calls.append([])
            fresh = held = 0
        calls[-1].append(key)
        fresh, held = fresh + (not in_lru), held + in_lru
    return calls


def encode_texts(rm, role: str, texts: list[tuple[bytes, str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(token counts, truncated, float16 embeddings, how many came from the LRU) of `texts` ((key, text, context
    head) each): one model-thread call. The LRU is read here, on the thread that scores, so none is evicted between
    the look and the use."""
    encoder = rm.encoder
    tokens = encoder.tokenize([t for _, t, _ in texts], role, [h for _, _, h in texts] if role == "context" else None)
    out = np.empty((len(texts), encoder.dim), dtype=np.float16)
    todo = []
    for i, (key, _, _) in enumerate(texts):
        held = rm.cache.get(key)
        if held is None:
            todo.append(i)
        else:
            out[i] = held
    if todo:
        subset = Tokenized([tokens.ids[i] for i in todo], tokens.lengths[todo], tokens.truncated[todo])
        for index, emb in encoder.encode_tokenized(subset, desc=f"learn {role}s", progress=False):
            out[np.asarray(todo)[index]] = emb
    return tokens.lengths, tokens.truncated, out, len(texts) - len(todo)


# ---------------------------------------------------------------------------------------------- training


def child_setup() -> None:
    """In the training child before it runs: niced, and killed with the server (Linux's PR_SET_PDEATHSIG), so a
    server killed mid-refresh leaves no child writing into STATE_DIR behind it."""
    os.nice(10)
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def train_in_child(job: dict) -> None:
    """Run `train_version(job)` in a niced child process with one torch thread: the heavy part stays off the
    server's cores and event loop. A failure is a ModrmError carrying the child's last lines."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="modrm-learn-", delete=False) as handle:
        json.dump(job, handle)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.learner", handle.name],
            env=env,
            capture_output=True,
            text=True,
            preexec_fn=child_setup,
        )
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise ModrmError(f"training a new version failed (exit {done.returncode}): {tail}")


class Table:
    """Embedding rows as one float16 tensor, gathered from two caches (the replayed one, then STATE_DIR's)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.tensor[rows].float()


def gather(cache: Cache, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The float16 embeddings of the distinct `rows` of `cache`, and each row's place among them."""
    distinct, places = np.unique(rows, return_inverse=True)
    block = np.asarray(cache.embeddings(0)[distinct]) if len(distinct) else np.empty((0, cache.fingerprint.dim))
    cache.check_finite(block)
    return torch.from_numpy(block.astype(np.float16)), places.reshape(rows.shape)


def pair_set(rows: np.ndarray | torch.Tensor, module_idx: np.ndarray | torch.Tensor) -> PairSet:
    return PairSet(torch.as_tensor(np.asarray(rows), dtype=torch.int64), torch.as_tensor(np.asarray(module_idx)))


def joined(first: PairSet, second: PairSet) -> PairSet:
    return PairSet(torch.cat([first.rows, second.rows]), torch.cat([first.module_idx, second.module_idx]))


@dataclass
class RefreshData:
    """What a refresh trains and judges on, as rows of one embedding table."""

    table: Table
    replayed: PairSet  # the checkpoint's own training pairs, a sample
    original_val: PairSet  # the checkpoint's own val split
    new_train: PairSet
    new_val: PairSet | None  # the new pairs held out by group (None: all fell in train)


def original_pairs(replay: Cache, modules: list[str], config: Config) -> tuple[PairSet, PairSet]:
    """The replay cache's train and val pairs, split as stage 0 split them, by the heads' module order."""
    indexed = replay.read_pairs(["target_module", "group"])
    found, train_pairs, val_pairs = split_sets(indexed, modules, config.data, replay.folder)
    if val_pairs is None:
        raise ModrmError(f"{replay.folder}: its pairs have no val split to judge a new version by")
    unknown = sorted(set(found) - set(modules))
    if unknown:
        raise ModrmError(f"{replay.folder}: pairs of module(s) {', '.join(unknown)}, which the heads lack")
    head_of = torch.tensor([modules.index(m) for m in found])  # the cache's module order -> the heads'
    return PairSet(train_pairs.rows, head_of[train_pairs.module_idx]), PairSet(
        val_pairs.rows, head_of[val_pairs.module_idx]
    )


def new_pairs(
    state: Cache, files: list[str], modules: list[str], config: Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gathered pairs as (cache rows [n, 4], head index, whether in the train split by group)."""
    pairs = load_pairs(files, modules)
    split = split_by_group([p.split_key for p in pairs], config.data)
    texts = [zip(PAIR_ROLES, config.encoder.pair_texts(p), strict=True) for p in pairs]
    rows = state.find(as_keys(b"".join(text_key(role, text) for four in texts for role, text in four))).reshape(-1, 4)
    if (rows < 0).any():
        raise ModrmError(f"{state.folder}: lacks texts of the pairs to train on; the refresh embeds them first")
    module_idx = np.array([modules.index(p.target_module) for p in pairs], dtype=np.int64)
    return rows, module_idx, np.array([split[p.split_key] == "train" for p in pairs])


def refresh_data(job: dict, start: Checkpoint, config: Config) -> RefreshData:
    """The new pairs (train split and held out) and as many of the checkpoint's training pairs (at least
    MIN_REPLAY), sampled with the config's seed, and its val split: their embeddings gathered into one table."""
    modules = start.model.module_names
    replay, state = Cache(job["replay"], start.fingerprint), Cache(job["cache"], start.fingerprint)
    orig_train, orig_val = original_pairs(replay, modules, config)
    rows, module_idx, is_train = new_pairs(state, job["files"], modules, config)
    n_replay = min(len(orig_train), max(int(is_train.sum()), MIN_REPLAY))
    chosen = np.sort(np.random.default_rng(config.train.seed).choice(len(orig_train), n_replay, replace=False))
    old_table, old_places = gather(replay, torch.cat([orig_train.rows[chosen], orig_val.rows]).numpy())
    new_table, new_places = gather(state, rows)
    new_places += len(old_table)
    return RefreshData(
        Table(torch.cat([old_table, new_table])),
        pair_set(old_places[:n_replay], orig_train.module_idx[chosen]),
        pair_set(old_places[n_replay:], orig_val.module_idx),
        pair_set(new_places[is_train], module_idx[is_train]),
        pair_set(new_places[~is_train], module_idx[~is_train]) if (~is_train).any() else None,
    )


def optimization(model: RewardHeads, n_train: int, tc) -> Optimization:
    """Stage 0's optimizer and schedule over the refresh's epochs."""
    steps = math.ceil(math.ceil(n_train / tc.batch_size) / tc.grad_accum) * tc.epochs
    groups = param_groups([(model.parameters(), tc.lr)], tc.weight_decay)
    cpu = torch.device("cpu")
    return Optimization(groups, steps, cpu, tc.dtype, tc.betas, tc.warmup_ratio, tc.max_grad_norm, fused=True)


def compared(model: RewardHeads, served: RewardHeads, pairs: PairSet | None, table: Table, cfg) -> dict | None:
    """Accuracy and loss of the new heads and of the served ones on `pairs`."""
    if pairs is None:
        return None
    after, before = (validate(heads, pairs, table.__getitem__, table.__getitem__, cfg) for heads in (model, served))
    return {
        "n_pairs": len(pairs),
        "accuracy": after["accuracy"],
        "served_accuracy": before["accuracy"],
        "loss": after["loss"],
        "served_loss": before["loss"],
    }


def train_version(job: dict) -> None:
    """The child's work: heads from the served ones, trained on the new pairs' train split and the replayed pairs
    (batches small enough for STEPS_PER_EPOCH steps where they are few), early-stopped on both val sets, measured
    against the served heads; written as a checkpoint to job["out"]."""
    torch.set_num_threads(1)
    start = load_checkpoint(job["start"])
    config = dataclasses.replace(start.config)
    if start.encoder_folder is not None:  # a stage-1 start: the version names its encoder folder
        config.encoder = dataclasses.replace(config.encoder, name=str(start.encoder_folder.resolve()))
    data = refresh_data(job, start, config)
    train_set = joined(data.replayed, data.new_train)
    val_set = data.original_val if data.new_val is None else joined(data.original_val, data.new_val)
    batch = max(MIN_BATCH, min(config.train.batch_size, len(train_set) // STEPS_PER_EPOCH))
    config.train = dataclasses.replace(config.train, epochs=job["epochs"], batch_size=batch, report_to=[], device="cpu")
    served = start.model.float()
    model = load_checkpoint(job["start"]).model.float().train()
    opt = optimization(model, len(train_set), config.train)
    run = Run(config, None, {}, model.module_names, train_set, val_set, data.table, model, opt, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="modrm-learn-runs-") as runs:
        epochs, best = train(run, Path(runs), Path(job["out"]).name, progress=False)
    summary = {
        "val": {
            "original": compared(model, served, data.original_val, data.table, config.heads),
            "new": compared(model, served, data.new_val, data.table, config.heads),
        },
        "best_epoch": best["epoch"],
        "epochs_run": len(epochs),
        "n_train": len(train_set),
        "n_new_train": len(data.new_train),
        "n_replayed": len(data.replayed),
        "started_from": job["start"],
    }
    cache = str(Path(job["cache"]).resolve())  # what `modrm eval` of the version embeds into

    def write(staging: Path) -> None:
        write_heads(staging, model, config, start.fingerprint, 0, cache, summary, [])
        (staging / EPOCH_LOG).write_text("".join(json.dumps(record) + "\n" for record in epochs))

    commit(job["out"], [*HEADS_FILES, EPOCH_LOG], write)


def main(argv: Sequence[str]) -> int:
    """The training child: `python -m pipeline.learner JOB.json`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train_version(json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
