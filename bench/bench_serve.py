"""Rewards for RL loops: `modrm serve` under concurrent clients, micro-batching on and off, and the Python API
against `modrm score`.

OpenRLHF's pattern is one trajectory per POST, many POSTs at once. A stage-0 checkpoint is trained here on
synthetic pairs (the offline MiniLM on the CPU by default), then `modrm serve` runs as a real process and
1, 8 and 32 client threads (each on its own keep-alive connection) send the same distinct trajectories, one
per request: trajectories/s and p50/p99 latency, with the default micro-batching (`--batch-wait-ms 5
--max-batch 256`) and with batches of one (`--max-batch 1`). The embedding LRU is off (`--cache-size 0`), so
every request costs the model its texts. Then `RewardModel.score` on 1,000 trajectories in-process against
`modrm score` on the same file (a new process: imports, model load, scoring, writing).

`bench_gpu.py` calls `run` with the 0.6B Qwen3 architecture on CUDA.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import table, use_all_cores, warn_if_busy, write_results

from pipeline.config import Config
from pipeline.encoder import MINILM_ID
from pipeline.synth import generate_pairs, write_pairs

CLIENTS = (1, 8, 32)
MODES = {"micro-batching": ["--batch-wait-ms", "5", "--max-batch", "256"], "batch of one": ["--max-batch", "1"]}


def train_checkpoint(workdir: Path, encoder: str, device: str, pairs_per_module: int) -> Path:
    from pipeline.embed import embed_files
    from pipeline.train_heads import train_heads

    data = write_pairs(workdir / "pairs.jsonl", generate_pairs(pairs_per_module, seed=0))
    config = Config()
    config.encoder.name, config.encoder.device, config.train.device = encoder, device, device
    config.train.epochs = 3
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
    command += ["--device", device, "--cache-size", "0", *flags]
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


def serve_rates(checkpoint: Path, device: str, requests: int, workdir: Path) -> list[dict]:
    items = trajectories(requests + 8)
    bodies = [json.dumps({"query": [i["task"] + i["trajectory"]], "prompts": [i["task"]]}).encode() for i in items]
    rows = []
    for mode, flags in MODES.items():
        process, port = start_server(checkpoint, device, flags, workdir / f"serve-{mode.replace(' ', '-')}.log")
        try:
            load(port, bodies[-8:], 8)  # warm-up, on trajectories the runs below do not send
            for clients in CLIENTS:
                rows.append({"mode": mode, **load(port, bodies[:requests], clients)})
        finally:
            process.terminate()
            process.wait()
    return rows


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


def run(encoder: str, device: str, requests: int, api_trajectories: int, pairs_per_module: int, workdir: Path) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checkpoint = train_checkpoint(workdir, encoder, device, pairs_per_module)
    return {
        "encoder": encoder,
        "device": device,
        "serve": serve_rates(checkpoint, device, requests, workdir),
        "api_vs_cli": api_vs_cli(checkpoint, device, api_trajectories, workdir),
    }


def report(result: dict) -> str:
    by_mode = {(r["mode"], r["clients"]): r for r in result["serve"]}
    rows = []
    for clients in CLIENTS:
        on, off = by_mode[("micro-batching", clients)], by_mode[("batch of one", clients)]
        rows.append(
            [
                clients,
                on["trajectories_per_s"],
                on["p50_ms"],
                on["p99_ms"],
                off["trajectories_per_s"],
                off["p50_ms"],
                off["p99_ms"],
                f"{on['trajectories_per_s'] / off['trajectories_per_s']:.2f}x",
            ]
        )
    a = result["api_vs_cli"]
    return "\n".join(
        [
            f"modrm serve, {result['encoder']} on {result['device']}, one trajectory per request:",
            table(
                ["clients", "batched traj/s", "p50 ms", "p99 ms", "batch-of-one traj/s", "p50 ms", "p99 ms", "gain"],
                rows,
            ),
            "",
            f"RewardModel.score on {a['trajectories']:,} trajectories: {a['api_score_seconds']:.2f}s "
            f"({a['api_trajectories_per_s']:,.1f}/s; load {a['api_load_seconds']:.1f}s once); `modrm score` on the "
            f"same file: {a['cli_seconds']:.2f}s ({a['cli_trajectories_per_s']:,.1f}/s, process start and load "
            "included)",
        ]
    )


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
