"""A reward server that learns: time from `POST /pairs` to the new version serving, and /get_reward's latency while
a refresh runs against idle.

A stage-0 checkpoint (default heads, the offline MiniLM on the CPU by default) is trained here on synthetic
pairs; then, for each size, `modrm serve --learn` runs as a real process with `--refresh-pairs` that size and a
fresh STATE_DIR. One client sends one trajectory per /get_reward request, back to back, for a while (idle),
then the new pairs (synth pairs of another seed, the same kinds) are posted in one request and the client goes on
until the refreshed version serves: the seconds from the POST to the first answer scored by the new version
(embedding the new texts through the model thread, training in the child, judging, swapping), and the p50/p99
latency of /get_reward while the refresh ran against the idle ones. The LRU is off (`--cache-size 0`), so every
request costs the model its texts. By default the client keeps the model busy (the learner's worst case: it gets
one small chunk between two requests); `--client-pause-s` makes it wait between requests, as a policy that scores
a batch and then trains leaves the model idle. Pairs of one round (short texts) keep the encoder's share of a
refresh small enough to reach 10,000 pairs on a CPU.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_serve import start_server, train_checkpoint, trajectories
from common import table, use_all_cores, warn_if_busy, write_results

from pipeline.data import pair_to_record
from pipeline.encoder import MINILM_ID
from pipeline.synth import generate_pairs

SIZES = (100, 1000, 10000)
IDLE_REQUESTS = 100
HEADERS = [
    "new pairs",
    "client pause s",
    "POST->202 s",
    "POST->served s",
    "embed s",
    "status",
    "idle p99 ms",
    "refresh p99 ms",
]


class Client:
    """One keep-alive connection sending one trajectory per /get_reward."""

    def __init__(self, port: int, items: list[dict], pause_s: float = 0.0):
        self.pause_s = pause_s
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.bodies = [json.dumps({"query": [i["trajectory"]], "prompts": [i["task"]]}).encode() for i in items]
        self.sent = 0

    def score(self) -> tuple[float, str]:
        """(seconds, head_version) of one request, after the pause."""
        time.sleep(self.pause_s)
        body = self.bodies[self.sent % len(self.bodies)]
        self.sent += 1
        start = time.perf_counter()
        self.connection.request("POST", "/get_reward", body, {"Content-Type": "application/json"})
        answer = json.loads(self.connection.getresponse().read())
        return time.perf_counter() - start, answer["head_version"]


def percentiles(latencies: list[float]) -> dict:
    cuts = statistics.quantiles(latencies, n=100)
    return {"n": len(latencies), "p50_ms": cuts[49] * 1e3, "p99_ms": cuts[98] * 1e3}


def refresh_time(checkpoint: Path, device: str, size: int, workdir: Path, pause_s: float) -> dict:
    """One server, one refresh of `size` new pairs: the time to the new version and the latencies around it."""
    state, log = workdir / f"state-{size}", workdir / f"serve-{size}.log"
    shutil.rmtree(state, ignore_errors=True)  # a fresh STATE_DIR: an old one's pairs would start a refresh at once
    flags = ["--learn", str(state), "--refresh-pairs", str(size), "--max-body-mb", "1024"]  # the LRU is off
    process, port = start_server(checkpoint, device, flags, log)
    try:
        client = Client(port, trajectories(200), pause_s)
        for _ in range(20):  # warm up
            client.score()
        idle = [client.score()[0] for _ in range(IDLE_REQUESTS)]
        base = client.score()[1]
        pairs = generate_pairs(size // 4, seed=1000 + size, max_rounds=1)
        body = "".join(json.dumps(pair_to_record(p)) + "\n" for p in pairs).encode()
        posting = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        start = time.perf_counter()
        posting.request("POST", "/pairs", body, {"Content-Type": "application/x-ndjson"})
        answer = posting.getresponse()
        assert answer.status == 202, answer.read()
        durable = time.perf_counter() - start
        answer.read()
        during = []
        while True:
            seconds, version = client.score()
            if version != base:
                break
            during.append(seconds)
        served = time.perf_counter() - start
        asking = http.client.HTTPConnection("127.0.0.1", port, timeout=600)  # the server closed the idle `posting`
        asking.request("GET", "/versions")
        record = json.loads(asking.getresponse().read())["versions"][-1]
    finally:
        process.terminate()
        process.wait(60)
    return {
        "new_pairs": size,
        "client_pause_s": pause_s,
        "post_to_202_s": durable,
        "post_to_new_version_s": served,
        "embed_s": record["seconds"]["embed"],
        "texts_encoded": record["texts_encoded"],
        "texts_from_lru": record["texts_from_lru"],
        "status": record["status"],
        "idle": percentiles(idle),
        "during_refresh": percentiles(during) if len(during) > 1 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=MINILM_ID)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--pairs-per-module", type=int, default=250, help="of the checkpoint's training data")
    parser.add_argument("--client-pause-s", type=float, default=0.0, help="between two /get_reward requests")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here between runs")
    args = parser.parse_args()
    started, busy = time.perf_counter(), warn_if_busy()
    use_all_cores()
    with tempfile.TemporaryDirectory(prefix="modrm-bench-learn-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = train_checkpoint(workdir, args.encoder, args.device, args.pairs_per_module, epochs=5, max_rounds=1)
        rows = []
        for size in args.sizes:  # each size's numbers written as soon as they are measured
            rows.append(refresh_time(checkpoint, args.device, size, workdir, args.client_pause_s))
            print(table(HEADERS, [row_cells(r) for r in rows]), flush=True)
            write_results("learn", {"encoder": args.encoder, "device": args.device, "refreshes": rows}, started, busy)


def row_cells(r: dict) -> list:
    during = r["during_refresh"]["p99_ms"] if r["during_refresh"] else "-"
    return [
        r["new_pairs"],
        r["client_pause_s"],
        r["post_to_202_s"],
        r["post_to_new_version_s"],
        r["embed_s"],
        r["status"],
        r["idle"]["p99_ms"],
        during,
    ]


if __name__ == "__main__":
    main()
