"""Shared by the benchmarks: the machine they ran on, a timer, a plain-text table, the results file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' model builder serves the benchmarks too
from random_qwen3 import build_random_qwen3 as build_random_qwen3  # noqa: E402 (re-exported)

RESULTS = ROOT / "artifacts" / "bench"


def use_all_cores() -> int:
    """torch's intra-op threads = the machine's cores (os.sched_getaffinity: what this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def machine() -> dict:
    info = {
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def warn_if_busy(seconds: float = 1.0) -> float:
    """Other processes on the same cores make every number here low: say so up front. Returns the share
    of all cores busy over `seconds` before the benchmark started (from /proc/stat; 0 where it is missing)."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values) - values[3] - values[4], sum(values)  # busy (all but idle and iowait), total

    try:
        busy0, total0 = ticks()
        time.sleep(seconds)
        busy1, total1 = ticks()
    except OSError:
        return 0.0
    busy = (busy1 - busy0) / max(1, total1 - total0)
    if busy > 0.2:
        print(f"warning: other processes keep {busy:.0%} of the cores busy; the numbers below will be low")
    return busy


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn's result, seconds it took); CUDA work is waited for so the time is real."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned columns (left for the first); floats with thousands separators and sensible digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [list(map(str, headers)), *([cell(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def write_results(name: str, results: dict, started: float, busy_at_start: float) -> Path:
    """artifacts/bench/<name>.json: the numbers, the machine and how long the whole script ran."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    info = machine() | {"cpu_busy_before_start": round(busy_at_start, 3)}
    payload = {"benchmark": name, "machine": info, "total_seconds": time.perf_counter() - started, **results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{name}: {payload['total_seconds']:.0f}s in all; numbers in {path.relative_to(ROOT)}")
    return path


def in_fresh_process(code: str) -> dict:
    """Run `code`, which leaves its results in a dict `r`, in a fresh interpreter (from the project's root), so
    the peak RSS added to them is its own: the high-water mark VmHWM (Linux), not ru_maxrss, which a child keeps
    from the parent it was forked from (here one that imported torch)."""
    tail = "\nimport json\nhwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))"
    tail += "\nr['peak_rss_mib'] = int(hwm.split()[1]) / 1024\nprint(json.dumps(r))\n"
    done = subprocess.run([sys.executable, "-c", code + tail], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])
