"""The `modrm` command line: exit codes, one-line errors, summaries, caches untouched.

One test runs `modrm` in a fresh interpreter, as a user does; the others call `cli.main` in this process (the same
exit codes and streams, without seconds of imports per command)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from in_process import modrm as in_process

MAIN = "from pipeline.cli import main; main()"


def fresh_process(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-c", MAIN, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def modrm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    code, out, err = in_process(*args)
    return subprocess.CompletedProcess(["modrm", *map(str, args)], code, out, err)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _bad_file(path: Path, seed_pairs_path: Path, malformed_line: bool = True) -> Path:
    """JSONL of four seed pairs, three of them broken; line 3 is malformed JSON if asked."""
    records = json.loads(seed_pairs_path.read_text(encoding="utf-8"))[:4]
    records[1]["positive"]["outcome"] = "yes"
    del records[2]["task"]
    records[3]["target_module"] = "critic"
    lines = [json.dumps(r) for r in records]
    if malformed_line:
        lines.insert(2, '{"pair_id": ')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text("[encoder]\nmax_context_tokens = 128\nmax_module_tokens = 64\n")
    return path


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory: pytest.TempPathFactory, seed_pairs_path: Path, tiny_qwen3: Path, tiny_toml: Path):
    """`modrm embed` once on the seed pairs: (cache folder, the finished process)."""
    work = tmp_path_factory.mktemp("cli")
    args = ["--encoder", tiny_qwen3, "--device", "cpu", "--config", tiny_toml, "--quiet"]
    done = modrm("embed", "--data", seed_pairs_path, "--cache", work / "cache", *args)
    return work / "cache", done, args


def test_validate_prints_every_problem_and_exits_2(tmp_path: Path, seed_pairs_path: Path) -> None:
    bad = _bad_file(tmp_path / "bad.jsonl", seed_pairs_path)
    done = fresh_process("validate", "--data", bad, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4, done.stderr
    assert all(line.startswith(f"{bad}: ") for line in lines)
    assert any("line 3" in line and "malformed JSON" in line for line in lines)
    assert any("pair_id 'reflection_1'" in line and "positive.outcome" in line for line in lines)
    assert any("pair_id 'reflection_2'" in line and "'task'" in line and "missing" in line for line in lines)
    assert any("pair_id 'reflection_3'" in line and "unknown module 'critic'" in line for line in lines)
    assert f"{bad}: 1 valid pairs, 4 problems" in done.stdout


def test_validate_passes_good_files(tmp_path: Path, seed_pairs_path: Path, seed_flat_path: Path) -> None:
    done = modrm("validate", "--data", seed_pairs_path, "--data", seed_flat_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("32 valid pairs, 0 problems") == 2


@pytest.mark.slow
def test_embed_prints_the_summary(cli_cache) -> None:
    _, done, _ = cli_cache
    assert done.returncode == 0, done.stderr
    assert "pairs: 32  unique texts: 98  already cached: 0" in done.stdout
    assert "encoded 98 texts" in done.stdout
    assert "splits: train" in done.stdout


@pytest.mark.slow
def test_a_second_embed_has_nothing_to_encode(cli_cache, seed_flat_path: Path, tmp_path: Path) -> None:
    cache, _, args = cli_cache
    done = modrm("embed", "--data", seed_flat_path, "--cache", cache, *args)
    assert done.returncode == 0, done.stderr
    assert "already cached: 98" in done.stdout
    assert "nothing to encode" in done.stdout


@pytest.mark.slow
def test_embed_on_a_bad_file_is_one_line_and_leaves_the_cache_alone(
    cli_cache, seed_pairs_path: Path, tmp_path: Path
) -> None:
    cache, _, args = cli_cache
    bad = _bad_file(tmp_path / "bad.jsonl", seed_pairs_path, malformed_line=False)
    before = _file_hashes(cache)
    assert "manifest.json" in before
    done = modrm("embed", "--data", bad, "--cache", cache, *args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = done.stderr.strip()
    assert line.startswith("error: ") and str(bad) in line
    assert "pair_id 'reflection_1', field 'positive.outcome'" in line
    assert "+2 more problems" in line
    assert "modrm validate" in line  # it points to the command that lists them all
    assert _file_hashes(cache) == before
    fresh = tmp_path / "no_cache_yet"
    done = modrm("embed", "--data", bad, "--cache", fresh, *args)
    assert done.returncode == 2 and not fresh.exists()


@pytest.mark.slow
def test_embed_with_a_different_encoder_setting_is_one_line(cli_cache, seed_pairs_path: Path, tmp_path: Path) -> None:
    cache, _, args = cli_cache
    toml = tmp_path / "longer.toml"
    toml.write_text("[encoder]\nmax_context_tokens = 256\nmax_module_tokens = 64\n")
    before = _file_hashes(cache)
    done = modrm("embed", "--data", seed_pairs_path, "--cache", cache, *args, "--config", toml)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"longer.toml: encoder.max_context_tokens = 256, but cache {cache} was made with 128" in done.stderr
    assert _file_hashes(cache) == before


@pytest.mark.parametrize(
    ("command", "content", "expected"),
    [
        ("embed", "[encoder]\nbogus = 1\n", "unknown key encoder.bogus"),
        ("validate", "[data]\nmodule = ['planner']\n", "unknown key data.module"),
        ("validate", "[encodr]\nname = 'x'\n", "unknown section [encodr]"),
        ("validate", "[encoder]\nmax_context_tokens = 'many'\n", "expected int"),
        ("validate", "[encoder\n", "malformed TOML"),
    ],
)
@pytest.mark.slow
def test_a_bad_config_is_a_one_line_error(
    tmp_path: Path, seed_pairs_path: Path, command: str, content: str, expected: str
) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(content)
    cache = ["--cache", tmp_path / "cache"] if command == "embed" else []
    done = modrm(command, "--data", seed_pairs_path, *cache, "--config", toml)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ") and expected in done.stderr
    assert not (tmp_path / "cache").exists()
