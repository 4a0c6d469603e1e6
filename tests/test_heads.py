"""Stage 0: the loss against a hand computation, training from a synthetic cache, checkpoints."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.cache import Cache, Shard, pack
from pipeline.checkpoint import load_checkpoint
from pipeline.config import Config, HeadConfig
from pipeline.encoder import Fingerprint
from pipeline.errors import ModrmError
from pipeline.heads import RewardHeads, preference_loss
from pipeline.train_heads import train_heads
from pipeline.training import autocast_dtype

MODULES = ["reflection", "planner", "executor", "memory"]


def test_loss_equals_hand_computation():
    r_pos = torch.tensor([2.0, 0.05, -1.0, 0.5])
    r_neg = torch.tensor([0.0, 0.0, 1.0, 0.5])
    module_idx = torch.tensor([0, 0, 1, 3])
    alpha, margin = 0.1, 0.1

    def per_pair(d: float) -> float:
        return math.log1p(math.exp(-d)) + alpha * max(0.0, margin - d)

    module0 = (per_pair(2.0) + per_pair(0.05)) / 2
    expected = (module0 + per_pair(-2.0) + per_pair(0.0)) / 3  # module 2 has no pairs: not in the mean
    got = preference_loss(r_pos, r_neg, module_idx, 4, alpha, margin)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_gradients_reach_only_the_heads_of_modules_in_the_batch():
    torch.manual_seed(0)
    model = RewardHeads(MODULES, 8, HeadConfig(hidden=16, hidden2=8))
    ctx, mod = torch.randn(6, 8), torch.randn(6, 8)
    module_idx = torch.tensor([0, 0, 1, 0, 0, 1])
    r = model(ctx, mod, module_idx)
    preference_loss(r[:3], r[3:], module_idx[:3], 4, 0.1, 0.1).backward()
    assert ctx.grad is None and mod.grad is None
    for name, p in model.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum() > 0
        in_batch = name.startswith(("norm.", "heads.0.", "heads.1."))
        assert touched == in_batch or (name.endswith(".bias") and not touched), name
    assert all(p.grad is None for p in model.heads[2].parameters())


def test_heads_group_rows_the_same_wherever_the_indices_live():
    """Rows of mixed modules, grouped on the host, equal each module's head applied row by row."""
    torch.manual_seed(0)
    model = RewardHeads(MODULES, 8, HeadConfig(hidden=16, hidden2=8)).eval()
    ctx, mod = torch.randn(9, 8), torch.randn(9, 8)
    module_idx = torch.tensor([3, 0, 1, 3, 3, 0, 1, 1, 0])
    got = model(ctx, mod, module_idx)
    for row in range(9):
        alone = model(ctx[row : row + 1], mod[row : row + 1], module_idx[row : row + 1])
        torch.testing.assert_close(got[row : row + 1], alone)
    assert not torch.equal(got, model(ctx, mod, torch.zeros(9, dtype=torch.int64)))


def test_autocast_dtype_resolves_auto_per_device_and_refuses_unknown_names():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("float32", torch.device("cpu")) is None
    assert autocast_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ModrmError, match="dtype 'fp8'"):
        autocast_dtype("fp8", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- a synthetic cache


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_cache(folder, n_tasks=40, pairs_per_task=4, dim=16, seed=0, nan=False, modules=MODULES, split_seed=0):
    """Embeddings where a positive module text lies along its module's direction, a negative against it."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(modules), dim))
    fp = Fingerprint("synthetic", None, "0" * 64, "mean", True, "", 64, 64, dim)
    cache = Cache.open(folder, fp)
    keys, embs, records = [], [], []
    for t in range(n_tasks):
        for j in range(pairs_per_task):
            m = (t * pairs_per_task + j) % len(modules)
            ctx = rng.normal(size=dim)
            for side, sign in (("pos", 1.0), ("neg", -1.0)):
                keys += [("context", sha256(f"{t}-{j}-{side}-c")), ("module", sha256(f"{t}-{j}-{side}-m"))]
                embs += [ctx + 0.1 * rng.normal(size=dim), sign * directions[m] + 0.5 * rng.normal(size=dim)]
            records.append((f"p{t}-{j}", modules[m], f"task {t}", len(keys) - 4))
    emb = np.array(embs, dtype=np.float16)
    if nan:
        emb[1, 0] = np.nan
    emb = np.nan_to_num(emb)
    half = len(keys) // 2  # two commits: two segments, which the memory-mapped table reads across
    for part in (slice(0, half), slice(half, None)):
        n, packed = len(keys[part]), pack(*zip(*keys[part], strict=True))
        cache.add_shard(Shard(packed, np.full(n, 10), np.zeros(n, dtype=bool), emb[part]))
        cache.commit(packed)
    if nan:  # corrupt the stored file the way a bad writer would
        import h5py

        with h5py.File(folder / "embeddings" / "seg-000000.h5", "r+") as f:
            f["embeddings"][1, 0] = np.nan
    config = Config()
    d = config.data
    d.split_seed = split_seed
    from pipeline.data import assign_split

    pairs = pa.table(
        {
            "pair_id": [r[0] for r in records],
            "target_module": [r[1] for r in records],
            "task": [r[2] for r in records],
            "group": [r[2] for r in records],
            "split": [assign_split(r[2], d.train_fraction, d.val_fraction, d.split_seed) for r in records],
            "pos_ctx_row": [r[3] for r in records],
            "pos_mod_row": [r[3] + 1 for r in records],
            "neg_ctx_row": [r[3] + 2 for r in records],
            "neg_mod_row": [r[3] + 3 for r in records],
            "pos_outcome": [1.0] * len(records),
            "neg_outcome": [0.0] * len(records),
        }
    )
    cache.commit(pack([], []), pairs.to_reader(), {"config": config.to_dict()})
    cache.close()
    return folder


def small_config(epochs=15) -> Config:
    config = Config()
    config.heads = HeadConfig(hidden=64, hidden2=32)
    config.train.epochs, config.train.batch_size, config.train.patience = epochs, 32, epochs
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = make_cache(tmp_path_factory.mktemp("cache"))
    out = tmp_path_factory.mktemp("ckpt")
    summary = train_heads(folder, out, small_config(), progress=False)
    return folder, out, summary


def test_training_fits_train_and_generalises(trained):
    folder, out, summary = trained
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == summary["epochs_run"]
    assert summary["val"]["val_accuracy"] >= 0.9
    ckpt = load_checkpoint(out)
    cache = Cache(folder, ckpt.fingerprint)
    table = cache.read_pairs().to_pydict()
    emb = torch.from_numpy(cache.embeddings().astype(np.float32))
    train = np.array(table["split"]) == "train"
    col = {k: torch.tensor(np.array(v)[train]) for k, v in table.items() if k.endswith("_row")}
    idx = torch.tensor([MODULES.index(m) for m in np.array(table["target_module"])[train]])
    with torch.inference_mode():
        r_pos = ckpt.model(emb[col["pos_ctx_row"]], emb[col["pos_mod_row"]], idx)
        r_neg = ckpt.model(emb[col["neg_ctx_row"]], emb[col["neg_mod_row"]], idx)
    assert (r_pos > r_neg).float().mean().item() == 1.0


def test_checkpoint_round_trip_and_determinism(trained, tmp_path):
    folder, out, _ = trained
    again = train_heads(folder, tmp_path, small_config(), progress=False)
    assert again["val"] == trained[2]["val"]
    a, b = load_checkpoint(out), load_checkpoint(tmp_path)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_checkpoint_mismatch_and_missing_files(trained, tmp_path):
    _, out, _ = trained
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    meta = json.loads((broken / "config.json").read_text())
    meta["modules"] = ["planner", "memory"]
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModrmError, match="does not match modules"):
        load_checkpoint(broken)
    (broken / "heads.safetensors").unlink()
    with pytest.raises(ModrmError, match=r"missing heads\.safetensors"):
        load_checkpoint(broken)


def test_bad_caches_are_refused_without_writing(tmp_path):
    nan_cache = make_cache(tmp_path / "nan", nan=True)
    with pytest.raises(ModrmError, match="non-finite"):
        train_heads(nan_cache, tmp_path / "out1", small_config(1), progress=False)
    assert not (tmp_path / "out1").exists()


def test_a_small_data_set_gets_a_val_and_a_test_split(tmp_path):
    """48 pairs over 24 task groups whose independent draws leave val empty: one group is moved there, and eval's
    test split is the one training left out."""
    from pipeline.config import DataConfig
    from pipeline.data import assign_split
    from pipeline.pairwise import split_by_group

    tasks = [f"task {t}" for t in range(24)]
    data = DataConfig(split_seed=5)
    assert "val" not in {assign_split(t, data.train_fraction, data.val_fraction, 5) for t in tasks}
    config = small_config(2)
    config.data = data
    summary = train_heads(make_cache(tmp_path / "cache", 24, 2, split_seed=5), tmp_path / "out", config, False)
    assert summary["n_val"] > 0 and summary["val"]["val_loss"] is not None
    split = split_by_group(tasks, data)
    assert summary["n_train"] + summary["n_val"] == 2 * sum(s != "test" for s in split.values())
    assert {s for s in split.values()} == {"train", "val", "test"}


def test_fewer_than_three_groups_train_without_validation_and_say_so(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    folder = make_cache(tmp_path / "cache", n_tasks=1)
    done = CliRunner().invoke(
        app, ["train-heads", "--cache", str(folder), "--out", str(tmp_path / "out"), "--epochs", "3", "--quiet"]
    )
    assert done.exit_code == 0, done.output
    assert "no val split" in done.output
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["val"] is None and summary["best_epoch"] == summary["epochs_run"] == 3
    assert [r["val_loss"] for r in _log(tmp_path / "out")] == [None, None, None]


def test_a_module_without_train_pairs_is_refused(tmp_path):
    folder = make_cache(tmp_path / "cache")
    table = Cache(folder, Fingerprint("synthetic", None, "0" * 64, "mean", True, "", 64, 64, 16)).read_pairs()
    data = table.to_pydict()
    data["target_module"] = [
        "critic" if split != "train" and i % 2 else m
        for i, (m, split) in enumerate(zip(data["target_module"], data["split"], strict=True))
    ]
    import pyarrow.parquet as pq

    pq.write_table(pa.table(data), folder / "pairs.parquet")
    with pytest.raises(ModrmError, match="critic have no train pairs"):
        train_heads(folder, tmp_path / "out", small_config(1), progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- the loop's options


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_waits_patience_epochs_after_the_best(tmp_path):
    """Val pairs with their sides swapped: the better training fits, the worse val gets, so it stops."""
    import pyarrow.parquet as pq

    folder = make_cache(tmp_path / "cache")
    table = pq.read_table(folder / "pairs.parquet").to_pydict()
    for i, split in enumerate(table["split"]):
        if split == "val":
            for a, b in (("pos_ctx_row", "neg_ctx_row"), ("pos_mod_row", "neg_mod_row")):
                table[a][i], table[b][i] = table[b][i], table[a][i]
    pq.write_table(pa.table(table), folder / "pairs.parquet")
    config = small_config(epochs=40)
    config.train.patience = 2
    summary = train_heads(folder, tmp_path / "out", config, progress=False)
    log = _log(tmp_path / "out")
    best = min(range(len(log)), key=lambda i: log[i]["val_loss"])
    assert summary["epochs_run"] == len(log) == best + 1 + 2 < 40 and summary["best_epoch"] == best + 1


def test_the_memory_mapped_table_trains_as_the_in_memory_one(trained, tmp_path):
    folder, _, summary = trained
    config = small_config()
    config.train.memory_budget_gb = 1e-9  # nothing fits: rows are gathered from the memory-mapped file
    mapped = train_heads(folder, tmp_path, config, progress=False)
    assert mapped["val"] == summary["val"]


def test_grad_accum_and_cpu_bf16_autocast_train(trained, tmp_path):
    folder, _, _ = trained
    config = small_config()
    config.train.grad_accum, config.train.batch_size = 3, 8
    assert train_heads(folder, tmp_path / "accum", config, progress=False)["val"]["val_accuracy"] >= 0.9
    config = small_config()
    config.train.dtype = "bfloat16"
    summary = train_heads(folder, tmp_path / "bf16", config, progress=False)
    log = _log(tmp_path / "bf16")
    assert log[-1]["train_loss"] < log[0]["train_loss"] and summary["val"]["val_accuracy"] >= 0.9
