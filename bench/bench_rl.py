"""`make bench-rl`: does modrm's module reward help RL? A multi-module agent learned with the outcome alone, against
the same agent credited per module by a reward model served by a real `modrm serve`.

The environment is `rl_env.py` (an episode is a task; each module picks one of 3 candidate outputs per round; the
outcome falls with every wrong pick). The policy is, per module, a softmax over the candidates whose logits are a
linear function of the candidates' frozen MiniLM embeddings, so it has to learn what a good output looks like.
Training is GRPO-style: groups of G episodes per task, advantages normalised within the group, one Adam step per
few groups, the same optimiser, steps and episodes for every arm:

- outcome: every module's advantage is the episode's outcome;
- module: module m's advantage is that of outcome + w * r_m, r_m the reward model's reward for module m (raw);
- module_norm: the same with r_m standardised per module by the run's running mean and std of r_m;
- oracle: module_norm with r_m the ground truth (1 where module m picked good outputs), the upper bound;
- control: module_norm with a reward model whose heads were trained on shuffled labels (sides swapped at random);
- module_weak: module with a weak reward model (stage 0 on pairs whose negatives are all blatant: it never saw the
  subtle failures the policy meets);
- online: module_weak with the reward model refreshed during the run (`modrm serve --learn`): every
  `refresh_every` episodes (`refreshes` times at most) the policy's rollouts since the last refresh go to
  POST /rollouts (mined server-side by `modrm pairs`' contrast), and the policy waits (polling GET /versions) until
  the learner has judged the new version, served or refused; that wait is counted apart from the run's time.

The reward model (stage 0 on synth pairs of task groups the policy never meets, or `--checkpoint DIR`) is called
over HTTP, one POST /score per group, as an RL loop would. Success is measured exactly (no sampling noise) on the
test tasks: P(outcome = 1) under the policy, from each decision's probability of the good candidate.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import math
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import rl_env as env
import torch
from common import ROOT, build_random_qwen3, machine, table, warn_if_busy

from pipeline.atomic import atomic_write, write_json
from pipeline.config import Config
from pipeline.encoder import MINILM_ID, Encoder
from pipeline.synth import write_pairs

ARMS = ("outcome", "module", "module_norm", "oracle", "control", "module_weak", "online")
QUICK_ARMS = ("outcome", "oracle", "control")
RM_OF_ARM = {"module": "rm", "module_norm": "rm", "control": "control", "module_weak": "weak", "online": "weak"}
TARGET = 0.8
OUT = ROOT / "artifacts" / "bench-rl"


@dataclass(frozen=True)
class Settings:
    """The experiment's knobs: every arm runs under the same ones."""

    seeds: int = 10
    episodes: int = 2048  # per run (arm x seed)
    train_tasks: int = 32
    test_tasks: int = 32
    group: int = 8  # G: episodes per task and group
    groups_per_step: int = 4
    lr: float = 0.1
    module_weight: float = 1.0  # w: module reward against the outcome's 1
    eval_every: int = 64  # episodes
    rm_pairs_per_module: int = 100
    rm_encoder: str = MINILM_ID
    rm_context_tokens: int = 64  # contexts keep the task and their end: every new trajectory costs the encoder this
    weak_pairs_per_module: int = 100  # the weak reward model (of module_weak and online): blatant negatives only
    refresh_every: int = 256  # online: episodes between two posts of the policy's rollouts
    refreshes: int = 1  # online: at most this many (each costs the learner tens of seconds on a busy CPU)


QUICK = Settings(
    seeds=3,
    episodes=768,
    train_tasks=8,
    test_tasks=8,
    rm_pairs_per_module=24,
    rm_encoder="tiny",
    weak_pairs_per_module=24,
)


# ---------------------------------------------------------------------------------------------- policy


def candidate_features(tasks: Sequence[env.Task], out: Path) -> torch.Tensor:
    """(tasks, decisions, K, 2 * dim): each candidate's frozen MiniLM embedding, and its product with the task's
    (what relates the output to the task: a plausible text about another task is wrong here). Embeddings are kept
    in `out` under a digest of the texts, so a rerun encodes nothing."""
    texts = [c.text for t in tasks for options in t.candidates for choices in options for c in choices]
    emb = embeddings([*texts, *(t.task for t in tasks)], out)
    candidates, task = torch.from_numpy(emb[: len(texts)]), torch.from_numpy(emb[len(texts) :])
    candidates = candidates.reshape(len(tasks), tasks[0].decisions, len(env.KINDS), -1)
    return torch.cat([candidates, candidates * task[:, None, None, :]], dim=-1)


def embeddings(texts: list[str], out: Path) -> np.ndarray:
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    path = out / f"features-{digest}.npy"
    if path.exists():
        return np.load(path)
    config = Config().encoder
    config.name, config.device = MINILM_ID, "cpu"
    emb = Encoder.load(config).encode(texts, "module")
    atomic_write(path, lambda tmp: save_array(tmp, emb))
    return emb


def save_array(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:
        np.save(handle, array)


class Policy:
    """Per module a linear map from a candidate's embedding to its logit (zero at start: uniform), Adam."""

    def __init__(self, dim: int, lr: float):
        self.weights = torch.zeros(len(env.MODULES), dim, requires_grad=True)
        self.optimiser = torch.optim.Adam([self.weights], lr=lr)

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """(..., decisions, K) log-probabilities; decision d belongs to module d mod len(MODULES)."""
        decisions = features.shape[-3]
        module_of = torch.arange(decisions) % len(env.MODULES)
        logits = torch.einsum("...dkh,dh->...dk", features, self.weights[module_of])
        return torch.log_softmax(logits, dim=-1)

    def step(self, loss: torch.Tensor) -> None:
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()


def success_on(policy: Policy, features: torch.Tensor, good: torch.Tensor) -> float:
    """Mean over tasks of P(outcome = 1) under the policy, exactly."""
    with torch.no_grad():
        p_good = policy.log_probs(features).exp().gather(-1, good.unsqueeze(-1)).squeeze(-1).numpy()
    return float(np.mean([env.expected_success(p) for p in p_good]))


# ---------------------------------------------------------------------------------------------- rewards


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """(G, modules) rewards -> advantages normalised within the group, column by column (0 where all are equal)."""
    std = rewards.std(axis=0)
    return np.where(std > 1e-8, (rewards - rewards.mean(axis=0)) / np.maximum(std, 1e-8), 0.0)


class RunningNorm:
    """Per module, the running mean and std of every reward seen so far in a run (Welford), for standardising."""

    def __init__(self, modules: int):
        self.count, self.mean, self.m2 = 0, np.zeros(modules), np.zeros(modules)

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        for row in rewards:
            self.count += 1
            delta = row - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (row - self.mean)
        std = np.sqrt(self.m2 / self.count)
        return (rewards - self.mean) / np.maximum(std, 1e-6)


class RewardClient:
    """`modrm serve` over a keep-alive connection: POST /score's rewards in MODULES order and the time spent, and
    the online learning endpoints. The server closes a connection left idle (its header timeout), so a closed one
    is opened again, once."""

    def __init__(self, port: int):
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.seconds, self.requests, self.trajectories = 0.0, 0, 0

    def score(self, items: list[dict[str, str]]) -> np.ndarray:
        start = time.perf_counter()
        answer = self.call("POST", "/score", json.dumps({"items": items}))
        self.seconds += time.perf_counter() - start
        self.requests += 1
        self.trajectories += len(items)
        return np.array([[row[m] for m in env.MODULES] for row in answer["rewards"]], dtype=np.float64)

    def call(self, method: str, path: str, body: str | None = None, content_type: str = "application/json") -> dict:
        """One request's JSON answer; anything but a 2xx is an error."""
        try:
            status, answer = self._request(method, path, body, content_type)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
            status, answer = self._request(method, path, body, content_type)
        if not 200 <= status < 300:
            raise RuntimeError(f"modrm serve answered {method} {path} with {status}: {answer}")
        return answer

    def _request(self, method: str, path: str, body: str | None, content_type: str) -> tuple[int, dict]:
        headers = {"Content-Type": content_type} if body is not None else {}
        self.connection.request(method, path, body, headers)
        response = self.connection.getresponse()
        return response.status, json.loads(response.read())


@contextmanager
def serving(checkpoint: Path, log: Path, flags: Sequence[str] = ()) -> Iterator[int]:
    """A `modrm serve` process (with `flags`) on a free port for the block; yields the port once /health answers.
    It gathers no micro-batch: the bench sends one request at a time, so waiting for company would only add."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "pipeline", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, "--device", "cpu", "--batch-wait-ms", "0", *flags], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 300
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"modrm serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=120)


def _healthy(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False


@dataclass
class PairCounts:
    """Pairs of a group's episodes whose ground truth differs for a module: how many the reward ordered right."""

    right: float = 0.0
    total: int = 0

    def add(self, labels: np.ndarray, rewards: np.ndarray) -> None:
        for m in range(labels.shape[1]):
            better = labels[:, m, None] > labels[None, :, m]
            diff = rewards[:, m, None] - rewards[None, :, m]
            self.right += float((better & (diff > 0)).sum() + 0.5 * (better & (diff == 0)).sum())
            self.total += int(better.sum())

    @property
    def accuracy(self) -> float | None:
        return self.right / self.total if self.total else None


# ---------------------------------------------------------------------------------------------- online learning


@dataclass
class Refreshes:
    """An online run's refreshes: the learner's verdicts, the posts that mined no pair, and the time spent waiting
    for the verdicts (apart from the run's own time)."""

    accepted: int = 0
    refused: int = 0
    no_pairs: int = 0
    wait_s: float = 0.0


def rollout_records(task: env.Task, picks: np.ndarray, outcome: np.ndarray, task_id: str) -> list[dict]:
    """A group's episodes in `modrm pairs`' rollout format (tagged trajectories), one task_id per group."""
    return [
        {"task_id": task_id, "task": task.task, "rollout_id": g, "outcome": float(o), "trajectory": task.trajectory(p)}
        for g, (p, o) in enumerate(zip(picks, outcome, strict=True))
    ]


def serve_base(client: RewardClient) -> None:
    """Serve the checkpoint's own heads again (POST /rollback): every run of a weak-model arm starts from them."""
    listing = client.call("GET", "/versions")
    base = next(v["version"] for v in listing["versions"] if v["status"] == "base")
    if listing["served"] != base:
        client.call("POST", "/rollback", json.dumps({"version": base}))


def refresh(client: RewardClient, rollouts: list[dict], refreshes: Refreshes, timeout_s: float = 1800) -> None:
    """POST the rollouts (mined by the server), then poll GET /versions until the learner has judged the version
    they start: refused, or accepted and served. No pair mined (every episode of each group alike): no version."""
    before = len(client.call("GET", "/versions")["versions"])
    start = time.perf_counter()
    body = "".join(json.dumps(r) + "\n" for r in rollouts)
    if not client.call("POST", "/rollouts", body, "application/x-ndjson")["accepted"]:
        refreshes.no_pairs += 1
        return
    while True:
        listing = client.call("GET", "/versions")
        if len(listing["versions"]) > before:
            newest = listing["versions"][-1]
            if newest["status"] == "refused" or listing["served"] == newest["version"]:
                break
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"modrm serve --learn judged no new version within {timeout_s:.0f} s")
        time.sleep(0.05)
    refreshes.wait_s += time.perf_counter() - start
    if newest["status"] == "refused":
        refreshes.refused += 1
    else:
        refreshes.accepted += 1


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class Run:
    """One arm's run for one seed: the test success curve and what its reward-model calls cost."""

    episodes: list[int] = field(default_factory=list)
    success: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    rm_s: float = 0.0
    rm_trajectories: int = 0
    rm_pairs: PairCounts = field(default_factory=PairCounts)
    rm_windows: list[PairCounts] = field(default_factory=list)  # the same, every refresh_every episodes apart
    rollouts: list[dict] = field(default_factory=list)  # online: the episodes not yet posted
    groups: int = 0
    refreshes: Refreshes = field(default_factory=Refreshes)
    pair_accuracy_after: float | None = None  # online: the served model's pair accuracy at the run's end

    def episodes_to(self, target: float) -> int | None:
        return next((e for e, s in zip(self.episodes, self.success, strict=True) if s >= target), None)


@dataclass
class World:
    """What every run shares: the tasks, their candidates' features and good picks."""

    train: list[env.Task]
    test: list[env.Task]
    train_features: torch.Tensor
    test_features: torch.Tensor

    def good_picks(self, t: int) -> np.ndarray:
        return np.array(self.train[t].good_picks())


def module_labels(wrong: np.ndarray) -> np.ndarray:
    """(G, decisions) wrong picks -> (G, modules): the share of each module's decisions that were right."""
    return 1.0 - wrong.reshape(len(wrong), -1, len(env.MODULES)).mean(axis=1)


def module_rewards(arm: str, task: env.Task, picks: np.ndarray, wrong: np.ndarray, client: RewardClient | None):
    """(G, modules) module rewards of a group, or None for the outcome arm."""
    if arm == "outcome":
        return None
    if arm == "oracle":
        return module_labels(wrong)
    items = [{"task": task.task, "trajectory": task.trajectory(row)} for row in picks]
    return client.score(items)


def group_loss(
    arm: str,
    policy: Policy,
    world: World,
    t: int,
    s: Settings,
    rng: np.random.Generator,
    generator: torch.Generator,
    norm: RunningNorm,
    client: RewardClient | None,
    run: Run,
) -> torch.Tensor:
    """One GRPO group on training task t: G episodes sampled from the policy, their outcomes drawn, each module's
    reward under `arm`, advantages normalised in the group; minus the advantage-weighted log-probability of every
    pick, as a share of a step's episodes."""
    log_probs = policy.log_probs(world.train_features[t])  # (decisions, K)
    picks = torch.multinomial(log_probs.exp(), s.group, replacement=True, generator=generator).T  # (G, decisions)
    wrong = picks.numpy() != world.good_picks(t)
    outcome = (rng.random(s.group) < env.success_probability(wrong.sum(axis=1))).astype(np.float64)
    rewards = np.repeat(outcome[:, None], len(env.MODULES), axis=1)
    extra = module_rewards(arm, world.train[t], picks.numpy(), wrong, client)
    if extra is not None:
        if client is not None:
            for counts in (run.rm_pairs, run.rm_windows[-1]):
                counts.add(module_labels(wrong), extra)
        rewards = rewards + s.module_weight * (extra if arm == "module" else norm(extra))
    if arm == "online":
        run.rollouts += rollout_records(world.train[t], picks.numpy(), outcome, f"group-{run.groups}")
    run.groups += 1
    advantages = torch.from_numpy(group_advantages(rewards)).float()
    per_decision = advantages[:, torch.arange(picks.shape[1]) % len(env.MODULES)]
    chosen = log_probs.gather(1, picks.T).T
    return -(per_decision * chosen).sum() / (s.group * s.groups_per_step)


def train(arm: str, seed: int, world: World, s: Settings, client: RewardClient | None = None) -> Run:
    """One policy trained under `arm` for s.episodes episodes; test success every s.eval_every episodes."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = Policy(world.train_features.shape[-1], s.lr)
    test_good = torch.tensor([t.good_picks() for t in world.test])
    norm = RunningNorm(len(env.MODULES))
    run, start = Run(), time.perf_counter()
    if client is not None and RM_OF_ARM[arm] == "weak":
        serve_base(client)
    rm_start = (client.seconds, client.trajectories) if client else (0.0, 0)
    order: list[int] = []
    episodes = 0
    while True:
        if episodes % s.eval_every == 0:
            run.episodes.append(episodes)
            run.success.append(success_on(policy, world.test_features, test_good))
        if episodes >= s.episodes:
            break
        if episodes % s.refresh_every == 0:
            if arm == "online" and 0 < episodes <= s.refreshes * s.refresh_every:
                refresh(client, run.rollouts, run.refreshes)
                run.rollouts = []
            run.rm_windows.append(PairCounts())
        loss = torch.zeros(())
        for _ in range(s.groups_per_step):
            if not order:
                order = rng.permutation(len(world.train)).tolist()
            loss = loss + group_loss(arm, policy, world, order.pop(), s, rng, generator, norm, client, run)
            episodes += s.group
        policy.step(loss)
    run.wall_s = time.perf_counter() - start - run.refreshes.wait_s
    if client is not None:
        run.rm_s, run.rm_trajectories = client.seconds - rm_start[0], client.trajectories - rm_start[1]
    return run


# ---------------------------------------------------------------------------------------------- reward models


def build_reward_models(out: Path, s: Settings, names: Sequence[str] = ("rm", "control")) -> tuple[dict, dict]:
    """The stage-0 checkpoints of `names`, and their training summaries: `rm` (synth pairs of the reward model's task
    groups), `control` (the same pairs, sides swapped at random), `weak` (pairs of the same groups whose negatives
    are all blatant: it never saw the subtle failures the policy meets). Each kept in `out` under a digest of its
    settings, so a rerun trains nothing."""
    pairs = env.reward_model_pairs(s.rm_pairs_per_module, seed=0) if {"rm", "control"} & set(names) else []
    data = {
        "rm": lambda: pairs,
        "control": lambda: env.shuffled_labels(pairs, seed=0),
        "weak": lambda: env.blatant_pairs(s.weak_pairs_per_module, seed=0),
    }
    checkpoints, summaries = {}, {}
    built = {*names, "rm"} if "control" in names else set(names)  # the control's cache is a copy of rm's, same rows
    for name in sorted(built, key=["rm", "control", "weak"].index):
        texts_of = checkpoints["rm"].parent / "cache" if name == "control" else None
        checkpoints[name], summaries[name] = trained_checkpoint(out, s, name, data[name], texts_of)
    return {n: checkpoints[n] for n in names}, {n: summaries[n] for n in names}


def trained_checkpoint(
    out: Path, s: Settings, name: str, pairs: Callable[[], list], texts_of: Path | None = None
) -> tuple[Path, dict]:
    """Checkpoint `name` trained from `pairs()` with the settings' encoder, or the one a run built before; its own
    cache records its training pairs (`serve --learn` replays them), copied from `texts_of` first where that cache
    holds the same texts (nothing to encode again)."""
    per_module = s.weak_pairs_per_module if name == "weak" else s.rm_pairs_per_module
    settings = {"pairs_per_module": per_module, "rm_encoder": s.rm_encoder, "rm_context_tokens": s.rm_context_tokens}
    settings |= {"layout": 3}
    root = out / f"{name}-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]}"
    summary_path = root / "summary.json"
    if summary_path.exists():
        return root / "checkpoint", json.loads(summary_path.read_text())
    from pipeline.embed import embed_files
    from pipeline.train_heads import train_heads

    config = Config()
    encoder = str(build_random_qwen3(out / "tiny-qwen3")) if s.rm_encoder == "tiny" else s.rm_encoder
    config.encoder.name, config.encoder.device, config.train.device = encoder, "cpu", "cpu"
    config.encoder.max_context_tokens, config.encoder.max_module_tokens = s.rm_context_tokens, 128
    data = pairs()
    if texts_of is not None:
        shutil.copytree(texts_of, root / "cache")
    embed_files([write_pairs(root / "pairs.jsonl", data)], root / "cache", config, progress=False)
    trained = train_heads(root / "cache", root / "checkpoint", config, progress=False)
    summary = {"pairs": len(data), "val": trained["val"], "settings": settings}
    write_json(summary_path, summary)
    return root / "checkpoint", summary


def pair_accuracy(client: RewardClient, tasks: Sequence[env.Task]) -> dict:
    """The reward model on the policy's training tasks (groups it never saw): for every decision and wrong
    candidate, the all-good trajectory against the one with that decision's pick made wrong. Accuracy: the share
    where the module's reward is higher on the good side, by module and by kind of wrong output."""
    right: dict[str, list[bool]] = {}
    for task in tasks:
        good = task.good_picks()
        flat = [choices for options in task.candidates for choices in options]
        variants = [(d, k) for d, choices in enumerate(flat) for k, c in enumerate(choices) if not c.good]
        picks = [good] + [[k if i == d else g for i, g in enumerate(good)] for d, k in variants]
        rewards = client.score([{"task": task.task, "trajectory": task.trajectory(p)} for p in picks])
        for row, (d, k) in enumerate(variants, start=1):
            m = d % len(env.MODULES)
            ok = bool(rewards[0, m] > rewards[row, m])
            for key in (env.MODULES[m], flat[d][k].kind, "all"):
                right.setdefault(key, []).append(ok)
    return {key: round(float(np.mean(oks)), 4) for key, oks in right.items()}


# ---------------------------------------------------------------------------------------------- summary


def interval(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and its 95% t-interval."""
    from scipy import stats

    mean = values.mean(axis=0)
    if len(values) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(axis=0, ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def median_episodes(episodes: list[int | None]) -> float | None:
    """The median of episodes to the target, a run that never reached it counted as later than any (None when
    half the runs or more never did)."""
    ranked = sorted(math.inf if e is None else e for e in episodes)
    median = float(np.median(ranked))
    return None if math.isinf(median) or math.isnan(median) else median


def summarise_arm(runs: list[Run], refresh_every: int) -> dict:
    success = np.array([r.success for r in runs])
    mean, low, high = interval(success)
    to_target = [r.episodes_to(TARGET) for r in runs]
    arm = {
        f"episodes_to_{TARGET}": to_target,
        f"median_episodes_to_{TARGET}": median_episodes(to_target),
        "final_success": [round(r.success[-1], 4) for r in runs],
        "curve": {
            "episodes": runs[0].episodes,
            "mean": mean.round(4).tolist(),
            "ci95_low": low.round(4).tolist(),
            "ci95_high": high.round(4).tolist(),
        },
        "wall_s": round(sum(r.wall_s for r in runs), 2),
    }
    rm_s, trajectories = sum(r.rm_s for r in runs), sum(r.rm_trajectories for r in runs)
    if trajectories:
        counts = PairCounts(sum(r.rm_pairs.right for r in runs), sum(r.rm_pairs.total for r in runs))
        arm["reward_model_calls"] = {
            "trajectories": trajectories,
            "trajectories_per_s": round(trajectories / rm_s, 1),
            "share_of_wall": round(rm_s / arm["wall_s"], 3),
            "accuracy_on_rollouts": rounded(counts.accuracy),
            "accuracy_on_rollouts_by_window": window_accuracies(runs, refresh_every),
        }
    if any(r.pair_accuracy_after is not None for r in runs):
        arm["refreshes"] = refresh_summary(runs)
    return arm


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def window_accuracies(runs: list[Run], every: int) -> dict:
    """The reward model's accuracy on the rollouts of each refresh_every episodes (pooled over seeds): before the
    first refresh, between the first and the second..."""
    windows = max(len(r.rm_windows) for r in runs)
    pooled = [
        PairCounts(sum(r.rm_windows[w].right for r in runs), sum(r.rm_windows[w].total for r in runs))
        for w in range(windows)
    ]
    return {"from_episode": [w * every for w in range(windows)], "accuracy": [rounded(p.accuracy) for p in pooled]}


def refresh_summary(runs: list[Run]) -> dict:
    """The online arm's refreshes over its runs, and each run's pair accuracy at its end."""
    return {
        "accepted": sum(r.refreshes.accepted for r in runs),
        "refused": sum(r.refreshes.refused for r in runs),
        "no_pairs_mined": sum(r.refreshes.no_pairs for r in runs),
        "per_run": [r.refreshes.accepted + r.refreshes.refused for r in runs],
        "wait_s": round(sum(r.refreshes.wait_s for r in runs), 2),
        "pair_accuracy_after": [r.pair_accuracy_after for r in runs],
    }


def plot(arms: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, arm in arms.items():
        curve = arm["curve"]
        axes.plot(curve["episodes"], curve["mean"], label=name)
        axes.fill_between(curve["episodes"], curve["ci95_low"], curve["ci95_high"], alpha=0.2)
    axes.axhline(TARGET, color="grey", linestyle="--", linewidth=0.8)
    axes.set(xlabel="training episodes", ylabel="test success (P(outcome = 1))", title=title, ylim=(0, 1))
    axes.legend(loc="lower right")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, help=f"seeds per arm (default {Settings.seeds}; quick {QUICK.seeds})")
    parser.add_argument("--episodes", type=int, help=f"episodes per run (default {Settings.episodes})")
    parser.add_argument("--checkpoint", type=Path, help="the reward model of arms module and module_norm (a stage-0 "
                        "or stage-1 checkpoint); default: one trained here on synth pairs of other tasks")  # fmt: skip
    parser.add_argument("--arms", default=None, help=f"comma-separated, of {', '.join(ARMS)} (default: all; quick: "
                        f"{', '.join(QUICK_ARMS)})")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few seeds, a small budget, a tiny reward-model "
                        "encoder: a smoke test of what is robust at that size")  # fmt: skip
    parser.add_argument("--module-weight", type=float, help=f"w, the module reward's weight against the outcome's 1 "
                        f"(default {Settings.module_weight})")  # fmt: skip
    parser.add_argument("--refresh-every", type=int, help=f"online: episodes between two refreshes (default "
                        f"{Settings.refresh_every}; a multiple of a step's episodes)")  # fmt: skip
    parser.add_argument("--refreshes", type=int, help=f"online: refreshes per run at most (default "
                        f"{Settings.refreshes})")  # fmt: skip
    parser.add_argument("--lr", type=float, help=f"Adam's learning rate, every arm's (default {Settings.lr})")
    parser.add_argument("--out", type=Path, default=OUT, help="results.json, the plot and the cached models")
    args = parser.parse_args(argv)
    args.arms = args.arms.split(",") if args.arms else list(QUICK_ARMS if args.quick else ARMS)
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)} (arms: {', '.join(ARMS)})")
    step = Settings.group * Settings.groups_per_step
    if args.refresh_every is not None and (args.refresh_every < step or args.refresh_every % step):
        parser.error(f"--refresh-every {args.refresh_every}: must be a multiple of {step} (a step's episodes)")
    if args.checkpoint and not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint}: not a checkpoint folder (no config.json)")
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    weight = s.module_weight if args.module_weight is None else args.module_weight
    s = replace(
        s, seeds=args.seeds or s.seeds, episodes=args.episodes or s.episodes, module_weight=weight, lr=args.lr or s.lr
    )
    refreshes = s.refreshes if args.refreshes is None else args.refreshes
    return replace(s, refresh_every=args.refresh_every or s.refresh_every, refreshes=refreshes)


def run_arms(args: argparse.Namespace, s: Settings, world: World) -> tuple[dict, dict]:
    """Every arm over every seed; the reward models built or loaded, served, and measured first."""
    served = sorted({RM_OF_ARM[a] for a in args.arms if a in RM_OF_ARM})
    reward_model: dict = {}
    built = [name for name in served if not (args.checkpoint and name == "rm")]
    checkpoints, reward_model["training"] = build_reward_models(args.out, s, built) if built else ({}, {})
    if args.checkpoint:
        checkpoints["rm"] = args.checkpoint
        reward_model["checkpoint"] = str(args.checkpoint)
    arms: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        clients = {}
        for name in served:
            flags = learning_flags(args.out / "learn") if name == "weak" else []
            port = stack.enter_context(serving(checkpoints[name], args.out / f"serve-{name}.log", flags))
            clients[name] = RewardClient(port)
            accuracy = pair_accuracy(clients[name], world.train)
            reward_model["accuracy" if name == "rm" else f"{name}_accuracy"] = accuracy["all"]
            reward_model[f"{name}_accuracy_by"] = accuracy
            clients[name].seconds = clients[name].trajectories = 0
        for arm in args.arms:
            client = clients.get(RM_OF_ARM.get(arm, ""))
            runs = []
            for seed in range(s.seeds):
                runs.append(train(arm, seed, world, s, client))
                if arm == "online":
                    runs[-1].pair_accuracy_after = pair_accuracy(client, world.train)["all"]
            arms[arm] = summarise_arm(runs, s.refresh_every)
            print(
                f"{arm}: episodes to {TARGET} {arms[arm][f'episodes_to_{TARGET}']}, final {arms[arm]['final_success']}"
            )
    return arms, reward_model


def learning_flags(state_dir: Path) -> list[str]:
    """`modrm serve --learn` in a fresh STATE_DIR that refreshes on every post (one pair starts a refresh) and never
    on a timer: the run decides when, so its result does not depend on the machine's speed."""
    shutil.rmtree(state_dir, ignore_errors=True)
    return ["--learn", str(state_dir), "--refresh-pairs", "1", "--refresh-seconds", "86400"]


def main(argv: Sequence[str] | None = None) -> dict:
    """The bench on one torch thread: the policy's tensors are tiny, and a second thread would only spin against
    the reward model's server for the same cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench(parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def bench(args: argparse.Namespace) -> dict:
    s = settings_of(args)
    busy = warn_if_busy()
    start, args.out = time.perf_counter(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    train_tasks, test_tasks = env.draw_tasks(s.train_tasks, "policy", 0), env.draw_tasks(s.test_tasks, "test", 0)
    world = World(
        train_tasks, test_tasks, candidate_features(train_tasks, args.out), candidate_features(test_tasks, args.out)
    )
    arms, reward_model = run_arms(args, s, world)
    wall = time.perf_counter() - start
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    results = {
        "benchmark": "bench-rl",
        "settings": asdict(s) | {"arms": args.arms, "rounds": 1, "candidates": len(env.KINDS), "target": TARGET},
        "arms": arms,
        "reward_model": reward_model,
        "goal": goal(arms),
        "machine": machine() | {"cpu_busy_before_start": round(busy, 3)},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "wall_s": round(wall, 1),
        "cpu_s": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1),
    }
    write_json(args.out / "results.json", results)
    plot(arms, args.out / "success.png", f"{s.seeds} seeds, mean and 95% interval")
    print(report(results))
    return results


def goal(arms: dict[str, dict]) -> dict | None:
    """Arm module's median episodes to the target against outcome's: the goal is at most half."""
    if "module" not in arms or "outcome" not in arms:
        return None
    key = f"median_episodes_to_{TARGET}"
    module, outcome = arms["module"][key], arms["outcome"][key]
    ratio = None if module is None or outcome is None else round(module / outcome, 3)
    met = module is not None and (outcome is None or module <= outcome / 2)
    return {"module_over_outcome": ratio, "met": met}


def report(results: dict) -> str:
    key = f"median_episodes_to_{TARGET}"
    rows = []
    for name, arm in results["arms"].items():
        calls = arm.get("reward_model_calls", {})
        finals = np.array(arm["final_success"])
        reached = sum(e is not None for e in arm[f"episodes_to_{TARGET}"])
        rows.append([name, arm[key] if arm[key] is not None else "-", f"{reached}/{len(finals)}", float(finals.mean()),
                     calls.get("trajectories_per_s", "-"), calls.get("share_of_wall", "-"),
                     calls.get("accuracy_on_rollouts", "-")])  # fmt: skip
    headers = ["arm", f"median eps to {TARGET}", "reached", "final", "RM traj/s", "RM share", "RM acc (rollouts)"]
    lines = [table(headers, rows), f"reward model: {json.dumps(results['reward_model'].get('accuracy'))} pairwise "
             f"accuracy on the policy's tasks; goal: {results['goal']}",
             f"{results['wall_s']:.0f} s wall, {results['cpu_s']:.0f} s CPU"]  # fmt: skip
    for name, arm in results["arms"].items():
        if "refreshes" in arm:
            windows = arm["reward_model_calls"]["accuracy_on_rollouts_by_window"]
            lines.append(f"{name}: refreshes {json.dumps(arm['refreshes'])}; RM accuracy on rollouts {windows}")
    if "weak_accuracy" in results["reward_model"]:
        lines.append(f"weak reward model: {results['reward_model']['weak_accuracy']} pairwise accuracy at the start")
    return "\n".join(lines)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its servers
    main()
