"""Peak memory of a whole `modrm embed`, against the number of texts it encodes.

Each size is a JSON lines file of N distinct texts (N / 4 pairs, texts of about 300 characters), embedded into a
fresh cache by `modrm embed` in a process of its own, with a tiny random Qwen3 built on the fly (the model is
not what is measured: what grows with N is). Peak RSS is the process's own (ru_maxrss), imports and the model
included; a second column runs the same process but stops after the imports and the model load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import build_random_qwen3, in_fresh_process, table, warn_if_busy, write_results

from pipeline.data import DEFAULT_MODULES

FILLER = "the agent read the logs, listed the open handles and compared them with the last run's. " * 3


def write_distinct_pairs(path: Path, n_texts: int) -> Path:
    """N / 4 pairs whose four texts are all distinct (nothing deduplicates), written a line at a time."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(n_texts // 4):
            sides = {
                side: {
                    "trajectory_full_context": f"Round 1: {side} run {i}. {FILLER}",
                    "module_k_all_rounds": f"{i} {side}",
                }
                for side in ("positive", "negative")
            }
            record = {"pair_id": f"p{i}", "target_module": DEFAULT_MODULES[i % 4], "task": f"task {i % 997}", **sides}
            out.write(json.dumps(record) + "\n")
    return path


def peak_rss(data: Path, cache: Path, model: Path, load_only: bool) -> dict:
    """`embed_files` (or, with load_only, the imports and the model load alone) in a fresh interpreter."""
    work = (
        "Encoder.load(config.encoder); summary = None"
        if load_only
        else f"summary = embed_files([{str(data)!r}], {str(cache)!r}, config, progress=False)"
    )
    return in_fresh_process(
        "import time\n"
        "from pipeline.config import Config\n"
        "from pipeline.embed import embed_files\n"
        "from pipeline.encoder import Encoder\n"
        f"config = Config(); config.encoder.name, config.encoder.device = {str(model)!r}, 'cpu'\n"
        f"start = time.perf_counter(); {work}\n"
        "r = {'seconds': time.perf_counter() - start, 'encoded': summary.encoded if summary else 0}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="texts")
    parser.add_argument("--workdir", type=Path, default=None, help="where the files and caches go")
    args = parser.parse_args()
    started = time.perf_counter()
    busy = warn_if_busy()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = build_random_qwen3(tmp / "tiny-qwen3", size="tiny")
        loaded = peak_rss(tmp, tmp, model, load_only=True)
        for n in args.sizes:
            data = write_distinct_pairs(tmp / f"pairs-{n}.jsonl", n)
            r = peak_rss(data, tmp / f"cache-{n}", model, load_only=False)
            rows.append({"texts": n, "input_mib": data.stat().st_size / 2**20, **r})
            print(f"embed, {n:,} texts: peak RSS {r['peak_rss_mib']:,.0f} MiB in {r['seconds']:.0f}s", flush=True)
            data.unlink()
    print()
    print(
        table(
            ["texts", "input (MiB)", "encoded", "seconds", "peak RSS (MiB)", "over imports + model (MiB)"],
            [
                (
                    r["texts"],
                    r["input_mib"],
                    r["encoded"],
                    r["seconds"],
                    r["peak_rss_mib"],
                    r["peak_rss_mib"] - loaded["peak_rss_mib"],
                )
                for r in rows
            ],
        )
    )
    print(f"(imports and the tiny model alone: {loaded['peak_rss_mib']:,.0f} MiB)")
    write_results("bench_embed_memory", {"imports_and_model": loaded, "embed": rows}, started, busy)


if __name__ == "__main__":
    main()
