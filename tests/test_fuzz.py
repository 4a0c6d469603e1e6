"""Every reader fed randomly damaged versions of valid files: the only outcomes are success or a one-line
`ModrmError` (never a traceback), and nothing already written changes. Seeded (derandomized) and fast."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cache import Cache, open_existing, pack
from pipeline.checkpoint import load_checkpoint
from pipeline.config import Config, EncoderConfig, HeadConfig, load_config
from pipeline.data import load_pairs
from pipeline.embed import embed_files
from pipeline.encoder import Encoder, describe
from pipeline.errors import ModrmError
from pipeline.score import read_trajectories
from pipeline.train_heads import train_heads

pytestmark = pytest.mark.slow  # training runs, subprocesses or many examples: `make test-fast` skips them

FIXTURES = Path(__file__).parent / "fixtures"
FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
OTHER_TYPES = (None, 3, -1.5, "x", [], {}, True)


def retyped(value: object, draw) -> object:
    """The value with one field somewhere inside dropped or given another type."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        change = draw(st.sampled_from(["drop", "retype", "inside"]))
        out = dict(value)
        if change == "drop":
            del out[key]
        elif change == "retype":
            out[key] = draw(st.sampled_from([t for t in OTHER_TYPES if type(t) is not type(value[key])]))
        else:
            out[key] = retyped(value[key], draw)
        return out
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], retyped(value[i], draw), *value[i + 1 :]]
    return draw(st.sampled_from(OTHER_TYPES))


def damaged_bytes(raw: bytes, draw) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "fields", "encoding", "empty"]))
    if how == "truncate":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if how == "flip":
        out = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if how == "fields":
        try:
            lines = raw.decode().splitlines()
            if raw.lstrip().startswith((b"[", b"{")) and len(lines) > 1 and not raw.lstrip().startswith(b'{"'):
                return json.dumps(retyped(json.loads(raw), draw)).encode()
            return "\n".join(json.dumps(retyped(json.loads(line), draw)) for line in lines if line).encode()
        except (ValueError, UnicodeDecodeError):
            return raw[::-1]
    if how == "encoding":
        return raw.decode("utf-8", errors="replace").encode(draw(st.sampled_from(["utf-16", "utf-32"])))
    return b""


def only_clean_outcomes(read: Callable[[], object]) -> None:
    """Reads, or fails with a ModrmError that says something: any other exception is a crash and fails the test
    (`cli.main` turns a ModrmError into one line on stderr)."""
    try:
        read()
    except ModrmError as err:
        assert str(err).strip()


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".lock"  # a writer's lock file, created by the first writer
    }


# ---------------------------------------------------------------------------------------------- files


@FUZZ
@given(data=st.data(), source=st.sampled_from(["seed_training_pairs.json", "seed_synthetic_dataset.json"]))
def test_pairs_files(tmp_path_factory, data, source):
    path = tmp_path_factory.mktemp("pairs") / source
    path.write_bytes(damaged_bytes((FIXTURES / source).read_bytes(), data.draw))
    only_clean_outcomes(lambda: load_pairs([path]))


TRAJECTORIES = "".join(
    json.dumps({"id": i, "task": "Debug a leak", "trajectory": f"Round {i}:\n<plan>step {i}</plan>"}) + "\n"
    for i in range(4)
).encode()


@FUZZ
@given(data=st.data())
def test_trajectory_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("traj") / "trajectories.jsonl"
    path.write_bytes(damaged_bytes(TRAJECTORIES, data.draw))
    only_clean_outcomes(lambda: read_trajectories(path))


TOML = b'[encoder]\nname = "x/y"\nmax_context_tokens = 512\n[train]\nepochs = 3\nbetas = [0.9, 0.99]\n'
TOML += b'[data]\nmodules = ["planner"]\n'


@FUZZ
@given(data=st.data())
def test_config_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("toml") / "config.toml"
    path.write_bytes(damaged_bytes(TOML, data.draw))
    only_clean_outcomes(lambda: load_config(path))


# ---------------------------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("fuzz")
    config = Config()
    config.encoder.name, config.encoder.device = str(tiny_qwen3), "cpu"
    config.encoder.max_context_tokens = config.encoder.max_module_tokens = 64
    config.heads, config.train.epochs = HeadConfig(hidden=8, hidden2=4), 1
    embed_files([FIXTURES / "seed_training_pairs.json"], root / "cache", config, progress=False)
    train_heads(root / "cache", root / "ckpt", config, progress=False)
    return root, describe(config.encoder).fingerprint


CACHE_FILES = ["embeddings/seg-000000.h5", "texts.parquet/seg-000000.parquet", "pairs.parquet", "manifest.json"]


@FUZZ
@given(data=st.data(), name=st.sampled_from(CACHE_FILES))
def test_cache_folders(folders, tmp_path_factory, data, name):
    root, fingerprint = folders
    cache = tmp_path_factory.mktemp("c") / "cache"
    shutil.copytree(root / "cache", cache)
    (cache / name).write_bytes(damaged_bytes((cache / name).read_bytes(), data.draw))
    before = tree(cache)

    def read() -> None:
        with Cache.open(cache, fingerprint) as store:
            store.read_pairs()
            store.embeddings()
            store.find(pack(["module"], ["0" * 64]))
        open_existing(cache)

    only_clean_outcomes(read)
    assert tree(cache) == before


ENCODER_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "modules.json",
    "1_Pooling/config.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
]


@FUZZ
@given(data=st.data(), name=st.sampled_from(ENCODER_FILES))
def test_encoder_folders(tiny_qwen3, tmp_path_factory, data, name):
    """A stage-1 checkpoint's encoder/ comes with the checkpoint: any of its files damaged, loading it is one line."""
    folder = tmp_path_factory.mktemp("e") / "encoder"
    shutil.copytree(tiny_qwen3, folder)
    (folder / name).write_bytes(damaged_bytes((folder / name).read_bytes(), data.draw))
    config = EncoderConfig(name=str(folder), device="cpu")
    only_clean_outcomes(lambda: Encoder.load(config, describe(config, folder)))


@FUZZ
@given(data=st.data(), name=st.sampled_from(["heads.safetensors", "config.json"]))
def test_checkpoint_folders(folders, tmp_path_factory, data, name):
    root, _ = folders
    ckpt = tmp_path_factory.mktemp("k") / "ckpt"
    shutil.copytree(root / "ckpt", ckpt)
    (ckpt / name).write_bytes(damaged_bytes((ckpt / name).read_bytes(), data.draw))
    before = tree(ckpt)
    only_clean_outcomes(lambda: load_checkpoint(ckpt))
    assert tree(ckpt) == before
