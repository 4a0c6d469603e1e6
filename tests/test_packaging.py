"""Every third-party module the package imports is a declared dependency (not one that arrives by chance)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules() -> set[str]:
    names = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("pipeline", "__future__")}


def declared(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = declared(project["dependencies"])
    optional = {extra: declared(reqs) for extra, reqs in project["optional-dependencies"].items()}
    distributions = md.packages_distributions()
    undeclared = []
    for module in sorted(imported_modules()):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        # optional features import their extra lazily and say which extra to install
        if not dists & (required | optional["lora"] | optional["offline"] | optional["tracking"]):
            undeclared.append(f"{module} ({', '.join(sorted(dists))})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_make_gives_each_encoder_its_own_cache():
    import subprocess

    def embed_line(*variables: str) -> str:
        command = ["make", "--no-print-directory", "-n", "embed", *variables]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        return next(line for line in done.stdout.splitlines() if "modrm embed" in line)

    assert "--cache cache/Qwen--Qwen3-Embedding-0.6B --encoder Qwen/Qwen3-Embedding-0.6B" in embed_line()
    mini = embed_line("ENCODER=sentence-transformers/all-MiniLM-L6-v2")
    assert "--cache cache/sentence-transformers--all-MiniLM-L6-v2 " in mini
    assert "--cache cache/mine " in embed_line("CACHE=cache/mine")
