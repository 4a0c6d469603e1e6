"""Checkpoints and input files from anywhere: reading one writes nothing and runs nothing it ships; writers touch
only plain entries of their own folder; damage is one line naming the file and the record, exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from in_process import modrm
from safetensors.torch import load_file, save_file

import pipeline.atomic as atomic
from pipeline.atomic import JOURNAL, RETIRED, STAGING, atomic_write, commit, recover
from pipeline.checkpoint import HEADS_FILES, load_checkpoint, read_checkpoint_config
from pipeline.config import FIXED_BY_CHECKPOINT, config_from_dict, load_config
from pipeline.data import ERROR_CHARS
from pipeline.errors import ModrmError
from pipeline.evaluate import training_curves

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"
TRAJECTORY = {"id": "a", "task": "Fix the login bug", "trajectory": "Round 1:\n<plan>read the logs</plan>"}


def refused(*args: str | Path) -> str:
    """The error line of `modrm ARGS`, which must be refused: exit 2, one line on stderr."""
    code, _, err = modrm(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder`, links as their targets, files by content: what a reader must leave as is."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "folder"
    return out


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


@pytest.fixture
def ckpt(stage0, tmp_path) -> Path:
    """A copy of the stage-0 checkpoint, to damage."""
    folder = tmp_path / "ckpt"
    shutil.copytree(stage0, folder)
    return folder


@pytest.fixture(scope="module")
def stage1_base(stage0, tmp_path_factory) -> Path:
    """A stage-1 checkpoint as `finetune` leaves one: the stage-0 heads with their encoder saved in encoder/ (the
    same weights, so the fingerprint holds)."""
    folder = tmp_path_factory.mktemp("stage1") / "ckpt"
    shutil.copytree(stage0, folder)
    shutil.copytree(stage0.parent / "qwen", folder / "encoder")
    edit_json(folder / "config.json", stage=1, cache=None)
    return folder


@pytest.fixture
def stage1(stage1_base, tmp_path) -> Path:
    folder = tmp_path / "stage1"
    shutil.copytree(stage1_base, folder)
    return folder


@pytest.fixture
def trajectories(tmp_path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(TRAJECTORY) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- commit journals


def plant_journal_through_links(folder: Path, victim: Path) -> None:
    """The attack: a journal naming x/important.txt, where x, .staging/x and .retired/x are links out."""
    (folder / "payload").mkdir()
    (folder / "payload" / "important.txt").write_text("planted")
    (folder / "x").symlink_to(victim)
    (folder / STAGING).mkdir()
    (folder / STAGING / "x").symlink_to("../payload")
    (folder / RETIRED).mkdir()
    (folder / "trash").mkdir()
    (folder / RETIRED / "x").symlink_to("../trash")
    (folder / JOURNAL).write_text(json.dumps(["x/important.txt"]))


@pytest.fixture
def victim(tmp_path) -> Path:
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "important.txt").write_text("mine")
    return folder


def test_opening_a_checkpoint_replays_no_journal_through_links(ckpt, victim, trajectories, tmp_path):
    plant_journal_through_links(ckpt, victim)
    before = tree(ckpt)
    line = refused("score", "--checkpoint", ckpt, "--input", trajectories, "--out", tmp_path / "o")
    assert f"{ckpt / JOURNAL}: a damaged commit journal (names 'x/important.txt', not a plain name)" in line
    assert (victim / "important.txt").read_text() == "mine" and tree(ckpt) == before


def test_a_writer_refuses_a_journal_through_links(ckpt, victim):
    plant_journal_through_links(ckpt, victim)
    with pytest.raises(ModrmError, match="not a plain name"):
        commit(ckpt, ["a.txt"], lambda staging: (staging / "a.txt").write_text("new"))
    assert (victim / "important.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("journal", "expected"),
    [
        ('["../escape"]', "names '../escape', not a plain name"),
        ('["/etc/passwd"]', "names '/etc/passwd', not a plain name"),
        ('[".staging"]', "names '.staging', not a plain name"),
        ('[".."]', "names '..', not a plain name"),
        ("[3]", "names 3, not a plain name"),
        ('{"a": 1}', "a dict, not a list"),
        ("[not json", "a damaged commit journal (Expecting value"),
        ("[" * 100_000, "a damaged commit journal (maximum recursion depth"),
    ],
)
def test_a_garbage_journal_is_one_line_for_writers_and_readers(ckpt, journal, expected):
    (ckpt / JOURNAL).write_text(journal)
    before = tree(ckpt)
    for run in (lambda: recover(ckpt), lambda: load_checkpoint(ckpt)):
        with pytest.raises(ModrmError) as err:
            run()
        assert str(err.value).startswith(f"{ckpt / JOURNAL}: ") and expected in str(err.value)
    assert tree(ckpt) == before


@pytest.mark.parametrize("link", [STAGING, RETIRED, JOURNAL, f"{STAGING}/a.txt", "a.txt"])
def test_recovery_follows_no_link(tmp_path, victim, link):
    """A link at any place recovery would move, delete or read is refused before anything changes."""
    folder = tmp_path / "out"
    commit(folder, ["a.txt"], lambda staging: (staging / "a.txt").write_text("old"))
    (folder / STAGING).mkdir()
    (folder / STAGING / "a.txt").write_text("new")
    (folder / JOURNAL).write_text('["a.txt"]')
    target = folder / link
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    target.symlink_to(victim if link in (STAGING, RETIRED) else victim / "important.txt")
    before = tree(folder)
    with pytest.raises(ModrmError, match=re.escape(f"{target}: is a symbolic link; modrm writes only plain files")):
        recover(folder)
    assert tree(folder) == before and tree(victim) == {"important.txt": hashlib.sha256(b"mine").hexdigest()}


def test_atomic_write_replaces_no_link(tmp_path, victim):
    link = tmp_path / "metrics.json"
    link.symlink_to(victim / "important.txt")
    with pytest.raises(ModrmError, match=r"metrics\.json: is a symbolic link"):
        atomic_write(link, lambda tmp: tmp.write_text("new"))
    planted = tmp_path / f".out.json.tmp-{os.getpid()}"  # where atomic_write stages its file
    planted.symlink_to(victim / "important.txt")
    atomic_write(tmp_path / "out.json", lambda tmp: tmp.write_text("new"))
    assert (tmp_path / "out.json").read_text() == "new" and (victim / "important.txt").read_text() == "mine"


def _interrupted_save(folder: Path, monkeypatch, kill_at: int) -> None:
    """`commit` of the checkpoint's files with doubled head weights, killed at its `kill_at`-th rename (1: the
    journal; then each of the three files is retired and moved in)."""
    calls = []
    real_replace = os.replace

    def replace(*args):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        return real_replace(*args)

    def write(staging: Path) -> None:
        for name in HEADS_FILES:
            shutil.copy2(folder / name, staging / name)
        save_file({k: 2 * v for k, v in load_file(folder / "heads.safetensors").items()}, staging / "heads.safetensors")

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        commit(folder, HEADS_FILES, write)
    monkeypatch.undo()


def _first_weight(folder: Path) -> float:
    return float(next(iter(load_checkpoint(folder).model.state_dict().values())).flatten()[0])


@pytest.mark.parametrize(("kill_at", "reads"), [(2, "old"), (3, "refused"), (4, "refused"), (7, "refused")])
def test_a_reader_of_an_interrupted_save_reads_a_whole_set_or_is_told_to_rerun_and_writes_nothing(
    ckpt, monkeypatch, kill_at, reads
):
    old = _first_weight(ckpt)
    _interrupted_save(ckpt, monkeypatch, kill_at)
    before = tree(ckpt)
    if reads == "refused":
        with pytest.raises(ModrmError, match=r"a save was interrupted part way .* run the command that wrote it"):
            read_checkpoint_config(ckpt)
    else:
        assert _first_weight(ckpt) == old
    assert tree(ckpt) == before  # the reader wrote nothing
    recover(ckpt)  # the writer's next run
    assert _first_weight(ckpt) == 2 * old


def test_a_reader_reads_a_save_moved_in_whole_as_it_is(ckpt):
    (ckpt / RETIRED).mkdir()
    for name in HEADS_FILES:  # every file moved in; the journal and the old files not yet removed
        shutil.copy2(ckpt / name, ckpt / RETIRED / name)
    (ckpt / JOURNAL).write_text(json.dumps(HEADS_FILES))
    before = tree(ckpt)
    assert load_checkpoint(ckpt).stage == 0 and tree(ckpt) == before


# ---------------------------------------------------------------------------------------------- shipped code


EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import Qwen3Config
class EvilConfig(Qwen3Config):
    pass
"""


def test_a_saved_config_never_turns_on_remote_code(stage1, trajectories, tmp_path):
    """The attack: encoder/ ships a .py its config.json maps to, and config.json says trust_remote_code."""
    marker = tmp_path / "code-ran"
    (stage1 / "encoder" / "evil.py").write_text(EVIL.format(marker=str(marker)))
    edit_json(stage1 / "encoder" / "config.json", auto_map={"AutoConfig": "evil.EvilConfig"})
    meta = json.loads((stage1 / "config.json").read_text())
    meta["config"]["encoder"] |= {"trust_remote_code": True, "use_safetensors": False}
    (stage1 / "config.json").write_text(json.dumps(meta))

    code, _, err = modrm("score", "--checkpoint", stage1, "--input", trajectories, "--out", tmp_path / "o", "--quiet")
    assert not marker.exists()
    assert code == 0, err  # scored with transformers' own Qwen3 code
    encoder = load_checkpoint(stage1).config.encoder
    assert (encoder.trust_remote_code, encoder.use_safetensors) == (False, True)


def test_a_checkpoint_of_remote_code_says_how_to_turn_it_on(ckpt, trajectories, tmp_path):
    meta = json.loads((ckpt / "config.json").read_text())
    meta["encoder"]["remote_code"] = True  # trained with the folder's own code: a saved config cannot turn it on
    (ckpt / "config.json").write_text(json.dumps(meta))
    line = refused("score", "--checkpoint", ckpt, "--input", trajectories, "--out", tmp_path / "o")
    assert "its heads were trained on embeddings of the encoder folder's own Python code" in line
    assert "encoder.trust_remote_code = true" in line


def test_only_the_runs_own_settings_turn_on_remote_code(stage0, tmp_path):
    saved = read_checkpoint_config(stage0)[1]
    raw = saved.to_dict()
    raw["encoder"] |= {"trust_remote_code": True, "use_safetensors": False}
    from_cache = config_from_dict(raw, "manifest.json")  # a cache's saved config is read the same way
    assert (from_cache.encoder.trust_remote_code, from_cache.encoder.use_safetensors) == (False, True)
    toml = tmp_path / "run.toml"
    toml.write_text("[encoder]\ntrust_remote_code = true\nuse_safetensors = false\n")
    config = load_config(toml, None, saved, f"checkpoint {stage0}", FIXED_BY_CHECKPOINT)
    assert (config.encoder.trust_remote_code, config.encoder.use_safetensors) == (True, False)


@pytest.mark.parametrize("command", ["score", "eval", "serve", "finetune"])
@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_is_the_runs_own_setting(monkeypatch, ckpt, trajectories, tmp_path, command, flag):
    """score, eval and serve take --trust-remote-code, finetune its --config: that setting reaches the encoder's
    loading, and only it does."""
    import pipeline.checkpoint

    seen = []

    def describe(config, folder=None):
        seen.append(config.trust_remote_code)
        raise ModrmError("stop here")

    monkeypatch.setattr(pipeline.checkpoint, "describe", describe)
    toml = tmp_path / "run.toml"
    toml.write_text(f"[encoder]\ntrust_remote_code = {str(flag).lower()}\n")
    args = {
        "score": ["--input", trajectories, "--out", tmp_path / "o", *(["--trust-remote-code"] if flag else [])],
        "eval": ["--data", SEED_PAIRS, "--out", tmp_path / "o", *(["--trust-remote-code"] if flag else [])],
        "serve": ["--port", "1", *(["--trust-remote-code"] if flag else [])],
        "finetune": ["--data", SEED_PAIRS, "--out", tmp_path / "o", "--config", toml],
    }[command]
    line = refused(command, "--checkpoint", ckpt, *args)
    assert line == "error: stop here" and seen == [flag]


# ---------------------------------------------------------------------------------------------- damaged files


DEEP = "[" * 100_000 + "]" * 100_000
LONG_INT = "1" * 5000


@pytest.mark.parametrize(
    ("value", "expected"),
    [(DEEP, "JSON nested too deeply to read"), (LONG_INT, "unreadable JSON (Exceeds the limit (4300 digits)")],
)
@pytest.mark.parametrize("layout", ["lines", "array"])
def test_json_too_deep_or_too_long_is_one_line_naming_the_record(stage0, tmp_path, value, expected, layout):
    good = json.loads(SEED_PAIRS.read_text())[:2]
    text = json.dumps(good[0])[:-1] + f', "note": {value}}}'
    pairs = tmp_path / "pairs.json"
    if layout == "lines":
        pairs.write_text(json.dumps(good[1]) + "\n" + text + "\n")
        where = "line 2"
    else:
        pairs.write_text("[" + json.dumps(good[1]) + ",\n" + text + "]")
        where = "record 1"
    code, _, err = modrm("validate", "--data", pairs)
    assert code == 2 and f"{pairs}: {where}: {expected}" in err
    cache = tmp_path / "cache"
    line = refused("embed", "--data", pairs, "--cache", cache, "--encoder", stage0.parent / "qwen", "--quiet")
    assert f"{pairs}: {where}: {expected}" in line and not cache.exists()

    trajectories = tmp_path / "in.json"
    record = json.dumps(TRAJECTORY)[:-1] + f', "note": {value}}}'
    if layout == "lines":
        trajectories.write_text(json.dumps(TRAJECTORY) + "\n" + record + "\n")
        where = "record 1 (line 2)"
    else:
        trajectories.write_text("[" + json.dumps(TRAJECTORY) + ", " + record + "]")
    line = refused("score", "--checkpoint", stage0, "--input", trajectories, "--out", tmp_path / "o")
    assert f"{trajectories}: {where}: {expected}" in line


def test_a_lone_surrogate_is_refused_by_every_reader(stage0, tmp_path):
    records = json.loads(SEED_PAIRS.read_text())[:2]
    text = json.dumps(records).replace('"module_k_all_rounds": "', '"module_k_all_rounds": "\\ud800', 1)
    pairs = tmp_path / "pairs.json"
    pairs.write_text(text)
    pair_id = records[0]["pair_id"]
    expected = f"{pairs}: pair_id {pair_id!r}, field 'positive.module_k_all_rounds': holds a lone surrogate (U+D800"
    code, _, err = modrm("validate", "--data", pairs)
    assert code == 2 and expected in err
    line = refused("embed", "--data", pairs, "--cache", tmp_path / "c", "--encoder", stage0.parent / "qwen", "--quiet")
    assert expected in line

    trajectories = tmp_path / "in.jsonl"
    trajectories.write_text(json.dumps(TRAJECTORY).replace("read the logs", "read \\udfff the logs") + "\n")
    line = refused("score", "--checkpoint", stage0, "--input", trajectories, "--out", tmp_path / "o")
    assert f"{trajectories}: record 0, field 'trajectory': holds a lone surrogate (U+DFFF at character 20)" in line


def _replace(name: str, content) -> callable:
    return lambda enc: (enc / name).write_text(content if isinstance(content, str) else json.dumps(content))


def _edit(name: str, **fields) -> callable:
    return lambda enc: edit_json(enc / name, **fields)


ENCODER_DAMAGE = {
    "modules.json not JSON": (_replace("modules.json", "{not json"), "modules.json: not a readable JSON file"),
    "modules.json an object": (_replace("modules.json", {"a": 1}), "modules.json: expected a JSON array, got a dict"),
    "a module not an object": (_replace("modules.json", [[1]]), "modules.json: module 0 must be a JSON object"),
    "a module without a type": (
        _replace("modules.json", [{"path": "1_Pooling"}]),
        "modules.json: module 0 has no 'type'",
    ),
    "a module's path outside": (
        _replace("modules.json", [{"type": "x.Pooling", "path": "../../.."}]),
        "modules.json: module 0's path '../../..' leaves the model folder",
    ),
    "pooling config a list": (_replace("1_Pooling/config.json", [1]), "1_Pooling/config.json: expected a JSON object"),
    "prompts a list": (_edit("config_sentence_transformers.json", prompts=[1]), "'prompts' must be a JSON object"),
    "a prompt not text": (_edit("config_sentence_transformers.json", prompts={"q": 3}), "prompt 'q' must be a string"),
    "max_seq_length text": (
        _edit("sentence_bert_config.json", max_seq_length="x"),
        "sentence_bert_config.json: 'max_seq_length' must be a JSON integer, got 'x'",
    ),
    "config.json not UTF-8": (
        lambda enc: (enc / "config.json").write_bytes(b"\xff{}"),
        "config.json: not a readable JSON file ('utf-8' codec",
    ),
    "hidden_size text": (_edit("config.json", hidden_size="x"), "config.json cannot be loaded"),
    "tokenizer.json a list": (_replace("tokenizer.json", [1]), "tokenizer.json: expected a JSON object, got a list"),
    "tokenizer.json deep": (
        _replace("tokenizer.json", DEEP),
        "tokenizer.json: not a readable JSON file (maximum recursion",
    ),
}


@pytest.mark.parametrize("damage", list(ENCODER_DAMAGE))
def test_a_damaged_stage1_encoder_file_is_one_line_naming_it(stage1, trajectories, tmp_path, damage):
    spoil, expected = ENCODER_DAMAGE[damage]
    spoil(stage1 / "encoder")
    line = refused("score", "--checkpoint", stage1, "--input", trajectories, "--out", tmp_path / "o")
    assert f"{stage1 / 'encoder'}/" in line and expected in line


def test_damaged_training_logs_are_left_out_of_the_plot_with_a_warning(capsys, ckpt, stage1, tmp_path):
    (ckpt / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 0.5}\n')  # no val_loss
    code, _, err = modrm("eval", "--checkpoint", ckpt, "--data", SEED_PAIRS, "--out", tmp_path / "e", "--quiet")
    assert code == 0, err
    assert f"warning: {ckpt / 'metrics.jsonl'} is damaged ('val_loss'); the training-curves plot leaves it out" in err
    assert (tmp_path / "e" / "training_curves.png").is_file() and (tmp_path / "e" / "metrics.json").is_file()
    for damage in ("{not json", '{"steps": [{"epoch": [1], "loss": 1}]}', "[]", DEEP):
        (stage1 / "metrics.json").write_text(damage)
        assert training_curves(load_checkpoint(stage1)) == {}
        assert f"warning: {stage1 / 'metrics.json'} is damaged" in capsys.readouterr().err


def test_eval_out_must_be_a_folder_of_plain_files_and_no_checkpoint(stage0, ckpt, tmp_path):
    def eval_into(out: Path, *more: Path) -> str:
        checkpoints = [a for c in (stage0, *more) for a in ("--checkpoint", c)]
        return refused("eval", *checkpoints, "--data", SEED_PAIRS, "--out", out, "--quiet")

    a_file = tmp_path / "report.txt"
    a_file.write_text("mine")
    assert f"--out {a_file}: is a file; name a folder" in eval_into(a_file)
    assert f"--out {ckpt}: is a checkpoint folder" in eval_into(ckpt)
    out = tmp_path / "out"
    (out / "stage0-stage0").mkdir(parents=True)  # where the first of two checkpoints' outputs go
    (out / "stage0-stage0" / "metrics.json").symlink_to(a_file)
    line = eval_into(out, ckpt)
    assert f"{out / 'stage0-stage0' / 'metrics.json'}: is a symbolic link" in line
    assert a_file.read_text() == "mine"


def test_an_error_line_is_capped_whatever_it_quotes(stage0, tmp_path):
    record = json.loads(SEED_PAIRS.read_text())[0]
    record["pair_id"], record["target_module"] = "p" * 1_000_000, "critic"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(record) + "\n")
    code, _, err = modrm("validate", "--data", pairs)
    assert code == 2 and "unknown module" not in err and max(map(len, err.splitlines())) <= ERROR_CHARS
    line = refused("embed", "--data", pairs, "--cache", tmp_path / "c", "--encoder", stage0.parent / "qwen", "--quiet")
    assert line.startswith(f"error: {pairs}: pair_id 'ppp") and line.endswith("\u2026")
    assert len(line) <= len("error: ") + ERROR_CHARS


@pytest.mark.parametrize("stage", [99, -1, True, "1", 1.0])
def test_a_checkpoint_stage_is_0_or_1(ckpt, stage):
    edit_json(ckpt / "config.json", stage=stage)
    with pytest.raises(ModrmError, match=rf"config.json is malformed \(stage {stage!r} is not 0 or 1\)"):
        load_checkpoint(ckpt)
