"""Rewards for RL loops: `modrm serve` under concurrent clients, micro-batching on and off, and the Python API
against `modrm score`.

OpenRLHF's pattern is one trajectory per POST, many POSTs at once. A stage-0 checkpoint is trained here on
synthetic pairs (the offline MiniLM on the CPU by default), then `modrm serve` runs as a real process and
1, 8 and 32 client threads (each on its own keep-alive connection) send distinct trajectories, one per request,
each row trajectories no row before it sent: trajectories/s and p50/p99 latency, with the default micro-batching
(`--batch-wait-ms 5 --max-batch 256`) and with batches of one (`--max-batch 1`). The embedding LRU is off
(`--cache-size 0`) unless a mode's flags set it, so every request costs the model its texts; with it on, what it
saves is only what repeats among fresh trajectories (the synthetic module outputs repeat often). Each row also
sums the server's own batch log: texts and tokens encoded, texts taken from the LRU, so tokens/s is what the
model actually encoded. Then `RewardModel.score` on 1,000 trajectories in-process against `modrm score` on the
same file (a new process: imports, model load, scoring, writing).

`bench_gpu.py` calls `run` with the 0.6B Qwen3 architecture on CUDA.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import table, use_all_cores, warn_if_busy, write_results

from pipeline.config import Config
from pipeline.encoder import MINILM_ID
from pipeline.synth import MAX_ROUNDS, generate_pairs, write_pairs

CLIENTS = (1, 8, 32)
Plan = list[tuple[str, list[str], tuple[int, ...]]]  # (mode, `modrm serve` flags, client counts)
PLAN: Plan = [
    ("micro-batching", ["--batch-wait-ms", "5", "--max-batch", "256"], CLIENTS),
    ("batch of one", ["--max-batch", "1"], CLIENTS),
]


def train_checkpoint(
    workdir: Path, encoder: str, device: str, pairs_per_module: int, epochs: int = 3, max_rounds: int = MAX_ROUNDS
) -> Path:
    """A stage-0 checkpoint in workdir/stage0 (the one already there, if a run before made it); its cache is the
    one `serve --learn` replays."""
    from pipeline.embed import embed_files
    from pipeline.train_heads import train_heads

    if (workdir / "stage0" / "config.json").exists():
        return workdir / "stage0"
    data = write_pairs(workdir / "pairs.jsonl", generate_pairs(pairs_per_module, seed=0, max_rounds=max_rounds))
    config = Config()
    config.encoder.name, config.encoder.device, config.train.device = encoder, device, device
    config.train.epochs = epochs
    embed_files([data], workdir / "cache", config, progress=False)
    train_heads(workdir / "cache", workdir / "stage0", config, progress=False)
    return workdir / "stage0"


def trajectories(n: int, seed: int = 7) -> list[dict]:
    """`n` distinct tagged trajectories with their tasks (both sides of synthetic pairs)."""
    pairs = generate_pairs(n // 8 + 1, seed=seed)
    sides = [(p.task, s.context) for p in pairs for s in (p.positive, p.negative)]
    return [{"task": task, "trajectory": context} for task, context in dict.fromkeys(sides)][:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, device: str, flags: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "pipeline", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    command += ["--device", device, *([] if "--cache-size" in flags else ["--cache-size", "0"]), *flags]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"modrm serve exited:\n{log.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"modrm serve did not come up:\n{log.read_text()[-3000:]}")


def load(port: int, bodies: list[bytes], clients: int) -> dict:
    """`clients` threads, each with one keep-alive connection, share the bodies; latency per request."""
    latencies: list[float] = []
    failures: list[str] = []
    next_body = iter(range(len(bodies)))
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                i = next(next_body, None)
            if i is None:
                return
            start = time.perf_counter()
            connection.request("POST", "/get_reward", bodies[i], {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            with lock:
                latencies.append(time.perf_counter() - start)
                if response.status != 200:
                    failures.append(payload.decode()[:200])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    latencies.sort()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return {
        "clients": clients,
        "requests": len(bodies),
        "seconds": seconds,
        "trajectories_per_s": len(bodies) / seconds,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


BATCH_LINE = re.compile(
    r"batch: \d+ requests, (\d+) trajectories, (\d+) texts encoded \((\d+) tokens\), (\d+) from cache"
)


def encoded(log: Path, offset: int) -> dict:
    """The server's batch lines written after `offset` (each is logged, and flushed, before its answers go out):
    trajectories, texts and tokens encoded, texts from the LRU."""
    with log.open() as f:
        f.seek(offset)
        counts = np.array([list(map(int, m.groups())) for m in BATCH_LINE.finditer(f.read())]).reshape(-1, 4)
    keys = ("logged_trajectories", "texts_encoded", "tokens_encoded", "texts_from_lru")
    return dict(zip(keys, counts.sum(0).tolist(), strict=True))


def serve_rates(checkpoint: Path, device: str, requests: int, workdir: Path, plan: Plan = PLAN) -> list[dict]:
    """Each mode of `plan` as a server of its own, under each of its client counts, each row on trajectories no row
    before it sent (so an LRU holds nothing of them)."""
    n_rows = sum(len(counts) for _, _, counts in plan)
    items = trajectories(requests * n_rows + 8)
    bodies = [json.dumps({"query": [i["task"] + i["trajectory"]], "prompts": [i["task"]]}).encode() for i in items]
    rows = []
    for mode, flags, client_counts in plan:
        started = time.perf_counter()
        log = workdir / f"serve-{slug(mode)}.log"
        process, port = start_server(checkpoint, device, flags, log)
        ready = time.perf_counter() - started
        try:
            load(port, bodies[-8:], 8)  # warm-up, on trajectories the runs below do not send
            for clients in client_counts:
                fresh = bodies[len(rows) * requests : (len(rows) + 1) * requests]
                offset = log.stat().st_size
                row = {"mode": mode, "flags": flags, "start_seconds": ready, **load(port, fresh, clients)}
                row |= encoded(log, offset)
                row["tokens_encoded_per_s"] = row["tokens_encoded"] / row["seconds"]
                rows.append(row)
        finally:
            process.terminate()
            process.wait()
    return rows


def slug(mode: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in mode)


def api_vs_cli(checkpoint: Path, device: str, n: int, workdir: Path) -> dict:
    from pipeline.reward import RewardModel

    items = trajectories(n)
    path = workdir / "trajectories.jsonl"
    path.write_text("".join(json.dumps({"id": i, **item}) + "\n" for i, item in enumerate(items)))
    start = time.perf_counter()
    rm = RewardModel.load(checkpoint, device, cache_size=0)
    loaded = time.perf_counter()
    rm.score(items[:8])  # warm-up
    scored = time.perf_counter()
    rm.score(items)
    done = time.perf_counter()
    command = [sys.executable, "-m", "pipeline", "score", "--quiet", "--checkpoint", str(checkpoint)]
    command += ["--input", str(path), "--out", str(workdir / "rewards.jsonl"), "--device", device]
    cli_start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    cli_seconds = time.perf_counter() - cli_start
    return {
        "trajectories": n,
        "api_load_seconds": loaded - start,
        "api_score_seconds": done - scored,
        "api_trajectories_per_s": n / (done - scored),
        "cli_seconds": cli_seconds,
        "cli_trajectories_per_s": n / cli_seconds,
    }


def phase_times(rm, items: list[dict], repeats: int) -> dict:
    """Median ms of each step of `RewardModel.score` on `items` (the LRU off), synchronised on CUDA: parsing,
    tokenizing, the context and module forward passes, the heads; and the whole call, for what is left over.
    `launch_ms` is the host's time to issue the context forward pass before waiting for it: near `contexts_ms`,
    the GPU waits on Python."""
    import numpy as np
    import torch

    from pipeline.reward import head_rewards
    from pipeline.trajectory import module_views

    enc, cfg = rm.encoder, rm.checkpoint.config.encoder

    def sync() -> float:
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        t0 = sync()
        contexts = [cfg.context_text(i["task"], i["trajectory"]) for i in items]
        views = [module_views(i["trajectory"], rm.modules) for i in items]
        texts = list(dict.fromkeys(v for row in views for v in row.values() if v))
        t1 = time.perf_counter()
        ctx_tokens = enc.tokenize(contexts, "context", [cfg.context_head(i["task"]) for i in items])
        mod_tokens = enc.tokenize(texts, "module")
        t2 = time.perf_counter()
        with torch.inference_mode():
            enc(enc.collate(ctx_tokens.ids[:1]))
            launched = time.perf_counter()
            t3 = sync()
        ctx = np.concatenate([e for _, e in enc.encode_tokenized(ctx_tokens, progress=False)])
        t4 = sync()
        mod = np.concatenate([e for _, e in enc.encode_tokenized(mod_tokens, progress=False)])
        t5 = sync()
        rows = np.arange(4 * len(items)) % len(ctx), np.arange(4 * len(items)) % len(mod)
        head_rewards(rm.heads, ctx[rows[0]], mod[rows[1]], np.arange(4 * len(items)) % len(rm.modules))
        t6 = sync()
        rm.score(items)
        t7 = sync()
        steps = {
            "parse_ms": t1 - t0,
            "tokenize_ms": t2 - t1,
            "launch_ms": launched - t2,
            "first_context_ms": t3 - t2,
            "contexts_ms": t4 - t3,
            "modules_ms": t5 - t4,
            "heads_ms": t6 - t5,
            "score_ms": t7 - t6,
        }
        for key, seconds in steps.items():
            times.setdefault(key, []).append(1e3 * seconds)
    return {
        "trajectories": len(items),
        "tokens": int(ctx_tokens.lengths.sum() + mod_tokens.lengths.sum()),
        **{k: statistics.median(v) for k, v in times.items()},
    }


def profile(checkpoint: Path, device: str, workdir: Path, budgets: tuple[int, ...] = (32768, 65536, 131072)) -> dict:
    """Where a request's time goes in process: the steps of a lone trajectory and of a batch of 32, a torch
    profile of lone calls (written to workdir/profile_lone.txt), and trajectories/s of 256 at several token
    budgets."""
    import torch

    from pipeline.reward import RewardModel

    rm = RewardModel.load(checkpoint, device, cache_size=0)
    items = trajectories(512, seed=11)
    rm.score(items[:32])  # warm-up
    result = {
        "lone": phase_times(rm, items[32:33], 1) | {"runs": [phase_times(rm, [i], 1) for i in items[33:53]]},
        "batch_32": phase_times(rm, items[64:96], 3),
    }
    runs = result["lone"].pop("runs")
    result["lone"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result["budgets"] = {}
    for budget in budgets:
        rm.encoder.config.token_budget = budget
        rm.score(items[:16])
        start = time.perf_counter()
        rm.score(items[128:384])
        result["budgets"][budget] = 256 / (time.perf_counter() - start)
    rm.encoder.config.token_budget = None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            for item in items[100:105]:
                rm.score([item])
        averages = prof.key_averages()
        by_device = "self_device_time_total" if len(activities) > 1 else "cpu_time_total"
        (workdir / "profile_lone.txt").write_text(
            averages.table(sort_by="self_cpu_time_total", row_limit=30)
            + "\n\n"
            + averages.table(sort_by=by_device, row_limit=20)
        )
    except Exception as err:  # a profiler that cannot attach (CUPTI missing) leaves the timings standing
        result["profiler_error"] = f"{type(err).__name__}: {err}"
    return result


def compiled(checkpoint: Path, device: str) -> dict:
    """The encoder compiled as `--compile` does (`Encoder.compile`, block by block) against eager: the compile
    with its warm-up calls, a lone trajectory's ms, 256 trajectories' rate, and the largest reward difference."""
    import numpy as np

    from pipeline.reward import RewardModel

    rm = RewardModel.load(checkpoint, device, cache_size=0)
    items = trajectories(300, seed=11)

    def measure() -> dict:
        start = time.perf_counter()
        rm.score(items[:2])
        first = time.perf_counter() - start
        rm.score(items[2:34])
        lone = []
        for item in items[34:44]:
            start = time.perf_counter()
            rm.score([item])
            lone.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        scores = rm.score(items[44:300])
        rate = 256 / (time.perf_counter() - start)
        values = np.array([[s[m] if s[m] is not None else np.nan for m in rm.modules] for s in scores])
        return {"first_call_s": first, "lone_ms": statistics.median(lone), "traj_per_s": rate, "values": values}

    eager = measure()
    start = time.perf_counter()
    rm.encoder.compile()
    compile_s = time.perf_counter() - start
    fast = measure()
    diff = float(np.nanmax(np.abs(eager.pop("values") - fast.pop("values"))))
    return {"eager": eager, "compiled": fast, "compile_s": compile_s, "max_reward_difference": diff}


def run(
    encoder: str,
    device: str,
    requests: int,
    api_trajectories: int,
    pairs_per_module: int,
    workdir: Path,
    plan: Plan = PLAN,
) -> dict:
    """The serving rows of `plan`, then (with api_trajectories) the Python API against `modrm score`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checkpoint = train_checkpoint(workdir, encoder, device, pairs_per_module)
    result = {"encoder": encoder, "device": device, "serve": serve_rates(checkpoint, device, requests, workdir, plan)}
    if api_trajectories:
        result["api_vs_cli"] = api_vs_cli(checkpoint, device, api_trajectories, workdir)
    return result


def report(result: dict) -> str:
    """One row per mode and client count; gain = trajectories/s over batch of one's at the same clients, on a
    server compiled alike (compiled rows against the compiled batch of one)."""

    def family(row: dict) -> tuple[bool, int]:
        return row["mode"].startswith("compiled"), row["clients"]

    one = {family(r): r["trajectories_per_s"] for r in result["serve"] if r["mode"].endswith("batch of one")}
    rows = [
        [
            r["mode"],
            r["clients"],
            r["trajectories_per_s"],
            r["p50_ms"],
            r["p99_ms"],
            f"{r['trajectories_per_s'] / one[family(r)]:.2f}x" if family(r) in one else "",
            r.get("tokens_encoded_per_s", ""),
            r["tokens_encoded"] / r["requests"] if "tokens_encoded" in r else "",
            f"{r['texts_from_lru'] / (r['texts_from_lru'] + r['texts_encoded']):.0%}" if "texts_encoded" in r else "",
        ]
        for r in result["serve"]
    ]
    headers = ["mode", "clients", "traj/s", "p50 ms", "p99 ms", "vs batch of one", "tok/s encoded", "tok/traj", "LRU"]
    lines = [
        f"modrm serve, {result['encoder']} on {result['device']}, one trajectory per request (tokens: what the model "
        "encoded, from the server's batch log; LRU: texts taken from it):",
        table(headers, rows),
    ]
    if "api_vs_cli" in result:
        a = result["api_vs_cli"]
        lines += [
            "",
            f"RewardModel.score on {a['trajectories']:,} trajectories: {a['api_score_seconds']:.2f}s "
            f"({a['api_trajectories_per_s']:,.1f}/s; load {a['api_load_seconds']:.1f}s once); `modrm score` on the "
            f"same file: {a['cli_seconds']:.2f}s ({a['cli_trajectories_per_s']:,.1f}/s, process start and load "
            "included)",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per client count and mode")
    parser.add_argument("--api-trajectories", type=int, default=1000)
    parser.add_argument("--pairs-per-module", type=int, default=50, help="synthetic pairs the checkpoint trains on")
    args = parser.parse_args()
    started = time.perf_counter()
    cores = use_all_cores()
    busy = warn_if_busy()
    print(f"bench_serve: MiniLM on CPU, {cores} threads")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(MINILM_ID, "cpu", args.requests, args.api_trajectories, args.pairs_per_module, Path(tmp))
    print(report(result))
    write_results("bench_serve", result, started, busy)


if __name__ == "__main__":
    main()
