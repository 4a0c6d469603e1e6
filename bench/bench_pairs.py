"""`modrm pairs` on large rollout files: rollouts per second and peak memory, against the number of rollouts.

Each size is a JSON lines file of N chat rollouts of about 3.5 KB (synth's rollouts of 4 rounds: groups of 8 per
task), with the tasks interleaved over the whole file (line i belongs to task i mod N/8), the worst order for
reading one task at a time. The file is built by repeating 64 generated tasks under new task ids, so building it
costs little beside what is measured. Each size is mined (contrast, the default) by `mine_rollouts` in a process of
its own; peak RSS is that process's high-water mark (`common.in_fresh_process`), imports included.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import in_fresh_process, table, warn_if_busy, write_results

from pipeline.synth import generate_rollouts

GROUP = 8
POOL_TASKS = 64
MARK = "@@TASK@@"


def rollout_templates() -> list[str]:
    """JSON lines of POOL_TASKS groups, the task id a mark to replace."""
    lines = []
    for record in generate_rollouts(POOL_TASKS, GROUP, seed=0, max_rounds=4):
        member = record["rollout_id"].rsplit("/", 1)[1]
        lines.append(json.dumps(record | {"task_id": MARK, "rollout_id": f"{MARK}/{member}"}))
    return lines


def write_rollouts(path: Path, n: int, templates: list[str]) -> Path:
    tasks = max(1, n // GROUP)
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            task, member = i % tasks, i // tasks
            out.write(templates[(task % POOL_TASKS) * GROUP + member % GROUP].replace(MARK, f"t{task}") + "\n")
    return path


def mine(data: Path, out: Path, imports_only: bool) -> dict:
    work = (
        "summary = None"
        if imports_only
        else f"summary = mine_rollouts([{str(data)!r}], {str(out)!r}, MineOptions(), RolloutFormat(), progress=False)"
    )
    return in_fresh_process(
        "import time\n"
        "from pipeline.mine import MineOptions, mine_rollouts\n"
        "from pipeline.rollouts import RolloutFormat\n"
        f"start = time.perf_counter(); {work}\n"
        "r = {'seconds': time.perf_counter() - start, 'pairs': sum(summary.pairs.values()) if summary else 0}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="rollouts")
    parser.add_argument("--workdir", type=Path, default=None, help="where the files go (1M rollouts: 3.5 GB)")
    args = parser.parse_args()
    started = time.perf_counter()
    busy = warn_if_busy()
    templates = rollout_templates()
    imports = mine(Path(), Path(), imports_only=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            data = write_rollouts(Path(tmp) / f"rollouts-{n}.jsonl", n, templates)
            r = mine(data, Path(tmp) / "pairs.jsonl", imports_only=False)
            rows.append({"rollouts": n, "input_mib": data.stat().st_size / 2**20, **r})
            print(
                f"pairs, {n:,} rollouts: {n / r['seconds']:,.0f}/s, peak RSS {r['peak_rss_mib']:,.0f} MiB", flush=True
            )
            data.unlink()
    print()
    print(
        table(
            ["rollouts", "input (MiB)", "pairs", "seconds", "rollouts/s", "peak RSS (MiB)"],
            [
                (
                    r["rollouts"],
                    r["input_mib"],
                    r["pairs"],
                    r["seconds"],
                    r["rollouts"] / r["seconds"],
                    r["peak_rss_mib"],
                )
                for r in rows
            ],
        )
    )
    print(f"(imports alone: {imports['peak_rss_mib']:,.0f} MiB)")
    write_results("bench_pairs", {"imports": imports, "pairs": rows}, started, busy)


if __name__ == "__main__":
    main()
