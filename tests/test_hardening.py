"""Damaged files and hostile input: one line naming the file and what is wrong, exit 2, nothing changed."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_cli import modrm

from pipeline.checkpoint import load_checkpoint
from pipeline.config import Config, HeadConfig
from pipeline.embed import embed_files
from pipeline.encoder import describe
from pipeline.errors import ModrmError
from pipeline.score import score_file
from pipeline.train_heads import train_heads

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".lock"  # a writer's lock file, created by the first writer
    }


@pytest.fixture(scope="module")
def config(tiny_qwen3: Path) -> Config:
    config = Config()
    config.encoder.name, config.encoder.device = str(tiny_qwen3), "cpu"
    config.encoder.max_context_tokens = config.encoder.max_module_tokens = 128
    config.heads = HeadConfig(hidden=16, hidden2=8)
    config.train.epochs = 1
    return config


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory, config: Config) -> Path:
    folder = tmp_path_factory.mktemp("good") / "cache"
    embed_files([SEED_PAIRS], folder, config, progress=False)
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_first_hash(path: Path) -> None:
    table = pq.read_table(path)
    hashes = table.column("text_hash").to_pylist()
    pq.write_table(table.set_column(0, "text_hash", pa.array(["not a hash", *hashes[1:]])), path)


def _keep_rows(path: Path, rows: int) -> None:
    pq.write_table(pq.read_table(path).slice(0, rows), path)


SEGMENT, TEXTS = Path("embeddings", "seg-000000.h5"), Path("texts.parquet", "seg-000000.parquet")
DAMAGE: dict[str, Callable[[Path], None]] = {
    "a segment missing": lambda c: (c / SEGMENT).unlink(),
    "a segment truncated": lambda c: truncate(c / SEGMENT),
    "a segment garbage": lambda c: (c / SEGMENT).write_bytes(b"\x89HDF\r\n not really"),
    "a segment's texts truncated": lambda c: truncate(c / TEXTS),
    "a segment's texts with a key that is not one": lambda c: _edit_first_hash(c / TEXTS),
    "a segment's texts short of its rows": lambda c: _keep_rows(c / TEXTS, 3),
    "manifest.json garbage": lambda c: (c / "manifest.json").write_text("{not json"),
    "manifest.json without a fingerprint": lambda c: (c / "manifest.json").write_text(
        '{"format": 2, "encoder": {"dim": 3}}'
    ),
}
EXPECTED = {
    "a segment missing": "seg-000000: ",
    "a segment truncated": "seg-000000: ",
    "a segment garbage": "seg-000000: ",
    "a segment's texts truncated": "seg-000000: ",
    "a segment's texts with a key that is not one": "seg-000000: a text_hash is not 64 hex digits",
    "a segment's texts short of its rows": "seg-000000: texts index of 3 rows, listed 98",
    "manifest.json garbage": "manifest.json is not valid JSON",
    "manifest.json without a fingerprint": "manifest.json has no valid encoder fingerprint",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_refused_with_the_repair_and_left_as_it_is(good_cache, config, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(good_cache, cache)
    DAMAGE[damage](cache)
    before = hashes(cache)
    for run in (
        lambda: embed_files([SEED_PAIRS], cache, config, progress=False),
        lambda: train_heads(cache, tmp_path / "ckpt", config, progress=False),
    ):
        with pytest.raises(ModrmError) as err:
            run()
        assert EXPECTED[damage] in str(err.value) and f"rm -r {cache}" in str(err.value)
    assert hashes(cache) == before and not (tmp_path / "ckpt").exists()


def test_damaged_pairs_index_and_pending_shard(good_cache, config, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(good_cache, cache)
    truncate(cache / "pairs.parquet")
    with pytest.raises(ModrmError, match=r"pairs\.parquet is unreadable"):
        train_heads(cache, tmp_path / "ckpt", config, progress=False)
    with pytest.raises(ModrmError, match=r"pairs\.parquet is unreadable"):  # embed reads the index it replaces
        embed_files([SEED_PAIRS], cache, config, progress=False)
    shutil.copy(good_cache / "pairs.parquet", cache / "pairs.parquet")
    pending = cache / "pending"
    pending.mkdir()
    fingerprint = describe(config.encoder).fingerprint.to_dict()
    (pending / "id.json").write_text(json.dumps({"id": "a run killed before its commit", "encoder": fingerprint}))
    (pending / "shard-000000.h5").write_bytes(b"\x89HDF not really")
    more = tmp_path / "more.json"
    records = json.loads(SEED_PAIRS.read_text())[:2]
    records[0]["positive"]["module_k_all_rounds"] += " (new)"
    more.write_text(json.dumps(records))
    with pytest.raises(ModrmError, match=r"shard-000000\.h5: an unfinished run's shard is damaged .*remove"):
        embed_files([more], cache, config, progress=False)


@pytest.fixture(scope="module")
def checkpoint(good_cache, config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "stage0"
    train_heads(good_cache, out, config, progress=False)
    return out


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: truncate(c / "heads.safetensors"), "heads.safetensors is not a readable safetensors file"),
        (
            lambda c: (c / "heads.safetensors").write_bytes(pickle.dumps({"norm.weight": [1.0]})),
            "heads.safetensors is not a readable safetensors file",
        ),
        (lambda c: (c / "config.json").write_text("[1, 2"), "config.json is malformed"),
        (lambda c: _edit(c, dim=10**9), r"heads.safetensors does not match modules .* and dim 1000000000"),
        (lambda c: _edit(c, modules=["planner", "planner"]), "names must be unique"),
        (lambda c: _edit(c, modules=3), "modules must be a list"),
    ],
)
def test_a_damaged_or_hostile_checkpoint_is_one_line(checkpoint, tmp_path, damage, expected):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    damage(folder)
    with pytest.raises(ModrmError, match=expected):
        load_checkpoint(folder)


def _edit(folder: Path, **fields) -> None:
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(meta | fields))


def test_score_refuses_non_utf8_input_and_a_folder_as_output(checkpoint, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"task": "caf\xe9", "trajectory": "<plan>x</plan>"}\n'.encode("latin-1"))
    with pytest.raises(ModrmError, match=r"latin1.jsonl: not UTF-8 text \(byte 13\)"):
        score_file(checkpoint, bad, tmp_path / "out.jsonl", progress=False)
    good = tmp_path / "good.jsonl"
    good.write_text('{"task": "t", "trajectory": "<plan>x</plan>"}\n')
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModrmError, match="folder: is a folder; name a file to write"):
        score_file(checkpoint, good, tmp_path / "folder", progress=False)


def test_pickled_encoder_weights_need_an_explicit_opt_in(tiny_qwen3, config, tmp_path):
    from transformers import AutoModel

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_qwen3, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(AutoModel.from_pretrained(tiny_qwen3).state_dict(), folder / "pytorch_model.bin")
    config = Config(**{**vars(config)})
    config.encoder = type(config.encoder)(**{**vars(config.encoder), "name": str(folder)})
    with pytest.raises(ModrmError, match=r"only pickled weights \(\*.bin\), which can run code"):
        embed_files([SEED_PAIRS], tmp_path / "cache", config, progress=False)
    assert not (tmp_path / "cache").exists()
    config.encoder.use_safetensors = False  # the user trusts the folder
    assert embed_files([SEED_PAIRS], tmp_path / "cache", config, progress=False).encoded > 0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-steps", "0"], "config finetune.max_steps: 0 is out of range (needs >= 1)"),
        (["--lora", "-2"], "config finetune.lora_r: -2 is out of range (needs >= 0)"),
        (["--gradient-checkpointing", "yes"], "config finetune.gradient_checkpointing: 'yes' is not one of"),
    ],
)
@pytest.mark.slow
def test_out_of_range_options_are_one_line_errors(checkpoint, tmp_path, flags, expected):
    done = modrm("finetune", "--checkpoint", checkpoint, "--data", SEED_PAIRS, "--out", tmp_path / "s1", *flags)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {expected}" or expected in done.stderr.strip().splitlines()[0]
    assert not (tmp_path / "s1").exists()


# ---------------------------------------------------------------------------------------------- the pairs index


def test_a_second_embed_says_it_replaced_the_index_or_appends_to_it(config, tmp_path):
    import pyarrow.parquet as pq

    records = json.loads(SEED_PAIRS.read_text())
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(records[:16]))
    b.write_text(json.dumps(records[16:]))
    cache = tmp_path / "cache"
    assert embed_files([a], cache, config, progress=False).index == ""
    replaced = embed_files([b], cache, config, progress=False)
    assert replaced.index == f"replaced: it held 16 pairs from {a} (--append keeps them)"
    assert pq.read_table(cache / "pairs.parquet").column("pair_id").to_pylist() == [r["pair_id"] for r in records[16:]]

    embed_files([a], cache, config, progress=False)
    appended = embed_files([b], cache, config, progress=False, append=True)
    assert appended.index == "appended 16 pairs to the 16 already indexed" and "pairs index: appended" in "\n".join(
        appended.lines()
    )
    assert pq.read_table(cache / "pairs.parquet").column("pair_id").to_pylist() == [r["pair_id"] for r in records]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["data_files"] == [str(a), str(b)] and manifest["n_pairs"] == 32

    before = hashes(cache)
    with pytest.raises(ModrmError, match=r"--append: pair_id '.+' is already in the pairs index"):
        embed_files([a], cache, config, progress=False, append=True)
    other_split = Config(**{**vars(config)})
    other_split.data = type(config.data)(**{**vars(config.data), "split_seed": 7})
    c = tmp_path / "c.json"
    c.write_text(json.dumps([{**r, "pair_id": r["pair_id"] + "-c"} for r in records[:2]]))
    with pytest.raises(ModrmError, match=r"--append with data.split_seed = 7, but the index was split with 0"):
        embed_files([c], cache, other_split, progress=False, append=True)
    assert hashes(cache) == before


# ---------------------------------------------------------------------------------------------- one config rule


def test_one_precedence_rule_defaults_saved_file_flags(tmp_path):
    from pipeline.config import FIXED_BY_CHECKPOINT, load_config

    saved = Config()
    saved.encoder.name, saved.encoder.device, saved.heads.hidden = "my/encoder", "cpu", 64
    saved.finetune.epochs = 3
    toml = tmp_path / "run.toml"
    toml.write_text('[finetune]\nepochs = 4\nencoder_lr = 5e-5\n[encoder]\nname = "my/encoder"\ndevice = "cuda"\n')
    config = load_config(
        toml, {"finetune": {"epochs": 5, "heads_lr": None}}, saved, "checkpoint c", FIXED_BY_CHECKPOINT
    )
    assert config.finetune.epochs == 5  # flags over the file over the saved config
    assert config.finetune.encoder_lr == 5e-5 and config.heads.hidden == 64  # file; saved
    assert config.encoder.name == "my/encoder" and config.encoder.device == "cuda"  # a repeat is fine; a run setting
    assert load_config(None, None, saved, "checkpoint c", FIXED_BY_CHECKPOINT).encoder.device == "auto"  # not inherited

    toml.write_text("[heads]\nhidden = 99\n")
    with pytest.raises(ModrmError, match=r"run.toml: heads.hidden = 99, but checkpoint c was made with 64"):
        load_config(toml, None, saved, "checkpoint c", FIXED_BY_CHECKPOINT)
    with pytest.raises(ModrmError, match=r"the command line: encoder.name = 'other', but checkpoint c was made"):
        load_config(None, {"encoder": {"name": "other"}}, saved, "checkpoint c", FIXED_BY_CHECKPOINT)


@pytest.mark.slow
def test_commands_start_from_the_cache_or_checkpoint_they_read(good_cache, checkpoint, tmp_path):
    """embed into a cache without --encoder uses the cache's encoder; train-heads and finetune refuse a
    --config that changes what the cache or checkpoint fixed, naming the file."""
    cache = tmp_path / "cache"
    shutil.copytree(good_cache, cache)
    done = modrm("embed", "--data", SEED_PAIRS, "--cache", cache, "--quiet")
    assert done.returncode == 0 and "nothing to encode" in done.stdout, done.stderr
    toml = tmp_path / "other.toml"
    toml.write_text("[data]\nsplit_seed = 3\n")
    done = modrm("train-heads", "--cache", cache, "--out", tmp_path / "h", "--config", toml)
    assert done.returncode == 2 and f"other.toml: data.split_seed = 3, but cache {cache} was made with 0" in done.stderr
    toml.write_text("[heads]\nhidden2 = 4\n")
    done = modrm(
        "finetune",
        "--checkpoint",
        checkpoint,
        "--data",
        SEED_PAIRS,
        "--out",
        tmp_path / "s",
        "--config",
        toml,
    )
    assert done.returncode == 2 and "other.toml: heads.hidden2 = 4, but checkpoint" in done.stderr
    assert not (tmp_path / "h").exists() and not (tmp_path / "s").exists()
