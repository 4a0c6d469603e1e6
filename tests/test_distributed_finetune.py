"""Stage 1 on two CPU processes (gloo), launched by torchrun exactly as a user would: the same optimizer steps as
one process, `--resume` on two processes, and rank 0 the only writer.

One torchrun launch serves every test (a module fixture): this file run as a worker (`__main__` below) does the
runs through `pipeline.finetune.finetune`, recording what each rank wrote and each rank's weights after every
epoch; then, in the same processes, `modrm finetune --resume` (the command line's `main`) continues the run the
worker stopped. The one-process references run in this process on one thread, as torchrun's workers do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pipeline.finetune as ft

pytestmark = pytest.mark.slow  # training runs, subprocesses or many examples: `make test-fast` skips them

ROOT = Path(__file__).resolve().parents[1]
SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"
BASE = {"epochs": 2, "token_budget": 2048, "save_every": 2, "encoder_lr": 1e-3, "heads_lr": 1e-3, "device": "cpu"}
# dropout off: one process and two make the same draws only where nothing is drawn; 19 micro-steps an epoch, so
# windows of 3 (rank 0 takes 2, rank 1 one) and a last window of 1 (rank 1 none)
EQUAL = {"finetune": BASE | {"grad_accum": 3, "encoder_dropout": 0.0, "token_budget": 1280}, "heads": {"dropout": 0.0}}
# fp16 autocast and the grad scaler: the first steps overflow at the initial scale and are skipped, on every rank
FP16 = {"finetune": BASE | {"grad_accum": 3, "encoder_dropout": 0.0, "dtype": "float16", "epochs": 1, "max_steps": 4}}
# dropout on (encoder and heads), so a resume that restored the wrong rank's RNG would show
DROPOUT = {"finetune": BASE | {"grad_accum": 2, "encoder_dropout": 0.2}, "heads": {"dropout": 0.2}}
# LoRA adapters (the base weights frozen, so DDP holds only the adapters) with activation checkpointing
LORA = {"finetune": BASE | {"grad_accum": 2, "epochs": 1, "lora_r": 4, "gradient_checkpointing": "on"}}
STOP_AT_SNAPSHOT = 3  # the stopped run ends as the third snapshot begins: two are on disk


class Stop(Exception):
    """Every rank stops at the same point: what a kill right after a snapshot leaves behind."""


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- the worker


def worker(spec: dict) -> None:
    """One rank of a torchrun launch: the runs of `spec`, then this rank's record (writes, weights per epoch)."""
    import pipeline.atomic as atomic

    rank = int(os.environ["RANK"])
    record: dict = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "writes": [], "weights": {}}
    run = {"name": ""}
    real_commit, real_write_json, real_validate = ft.commit, ft.write_json, ft.validate_end_to_end

    def commit(folder, names, write, remove=()):
        record["writes"].append([run["name"], "commit", names])
        return real_commit(folder, names, write, remove)

    def write_json(path, obj):
        record["writes"].append([run["name"], "write_json", Path(path).name])
        return real_write_json(path, obj)

    def validate(model, val, config):  # after every epoch (and before the first): this rank's weights
        record["weights"].setdefault(run["name"], []).append(digest(model.state_dict()))
        return real_validate(model, val, config)

    ft.commit, ft.write_json, ft.validate_end_to_end = commit, write_json, validate
    assert atomic.commit is real_commit  # nothing else writes through another name
    for item in spec["runs"]:
        run["name"] = item["name"]
        stop = item.get("stop_at_snapshot")
        if stop:
            real_rng, calls = ft.rng_state, []

            def rng_state(real_rng=real_rng, calls=calls, stop=stop):
                calls.append(1)
                if len(calls) == stop:
                    raise Stop
                return real_rng()

            ft.rng_state = rng_state
        try:
            result = ft.finetune(spec["stage0"], [Path(spec["data"])], item["out"], item["overrides"], progress=False)
            record[item["name"]] = {"steps": result["steps"], "history": result["history"]}
        except Stop:
            record[item["name"]] = "stopped"
        finally:
            if stop:
                ft.rng_state = real_rng
    stopped = Path(spec["resume_argv"][spec["resume_argv"].index("--out") + 1])
    record["snapshot_after_stop"] = sorted(load_file(str(stopped / ft.SNAPSHOT_DIR / ft.RNG_FILE)))
    run["name"], sys.argv = "resumed", ["modrm", *spec["resume_argv"]]
    from pipeline.cli import main

    try:
        main()
    except SystemExit as exit:  # the command line ends by exiting
        assert not exit.code, exit.code
    Path(spec["log"], f"rank{rank}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def one_thread():
    """The references on one thread, as torchrun starts its workers (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launch(stage0, tmp_path_factory) -> dict:
    """Two processes: the equality runs, an uninterrupted run with dropout, and the same run stopped after two
    snapshots; then `modrm finetune --resume` on two processes continues the stopped one."""
    root = tmp_path_factory.mktemp("ddp")
    runs = [
        {"name": "equal", "out": str(root / "equal"), "overrides": EQUAL},
        {"name": "fp16", "out": str(root / "fp16"), "overrides": FP16},
        {"name": "lora", "out": str(root / "lora"), "overrides": LORA},
        {"name": "full", "out": str(root / "full"), "overrides": DROPOUT},
        {"name": "stopped", "out": str(root / "resumed"), "overrides": DROPOUT, "stop_at_snapshot": STOP_AT_SNAPSHOT},
    ]
    config = root / "resume.toml"
    f = DROPOUT["finetune"]
    config.write_text(
        "[finetune]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in f.items() if k != "device") + "[heads]\n"
        f"dropout = {DROPOUT['heads']['dropout']}\n"
    )
    assert tomllib.loads(config.read_text())["finetune"]["encoder_dropout"] == 0.2
    resume = ["finetune", "--checkpoint", str(stage0), "--data", str(SEED_PAIRS), "--out", str(root / "resumed")]
    resume += ["--config", str(config), "--device", "cpu", "--resume", "--quiet"]
    spec = {"stage0": str(stage0), "data": str(SEED_PAIRS), "log": str(root), "runs": runs, "resume_argv": resume}
    (root / "spec.json").write_text(json.dumps(spec))
    done = torchrun(__file__, str(root / "spec.json"))
    records = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"root": root, "records": records, "cli": done}


def reference(stage0: Path, out: Path, overrides: dict) -> dict:
    return ft.finetune(stage0, [SEED_PAIRS], out, overrides, progress=False)


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights training ended with (the snapshot) and the best epoch's checkpoint (encoder and heads)."""
    weights = {f"snapshot/{k}": v for k, v in load_file(str(folder / ft.SNAPSHOT_DIR / "model.safetensors")).items()}
    weights |= {f"best/{k}": v for k, v in load_file(str(folder / "encoder" / "model.safetensors")).items()}
    return weights | {f"best/{k}": v for k, v in load_file(str(folder / "heads.safetensors")).items()}


# ---------------------------------------------------------------------------------------------- tests


def test_the_plan_splits_unevenly(stage0):
    """The equality runs cover what splitting must get right: windows whose micro-steps do not divide among two
    ranks (odd, and a single one, where rank 1 has nothing to do), windows that leave a module's head unused, and
    heads a rank uses only before its last micro-step (whose gradients DDP holds under no_sync)."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.distributed import Group
    from pipeline.encoder import Encoder

    ckpt = load_checkpoint(stage0)
    encoder = Encoder.load(dataclasses.replace(ckpt.config.encoder, device="cpu"), ckpt.encoder_info())
    train = ft.tokenize_pairs(encoder, ft.load_split([SEED_PAIRS], ckpt)["train"], ckpt.model.module_names)
    f = EQUAL["finetune"]
    plans = [ft.windows(ft.plan_steps(train, f["token_budget"], 0, e), f["grad_accum"]) for e in range(f["epochs"])]
    sizes = [len(w) for plan in plans for w in plan]
    assert 3 in sizes and any(n % 2 for n in sizes)
    shares = [[len(Group(r, 2).share(w)) for r in (0, 1)] for plan in plans for w in plan]
    assert [2, 1] in shares and [1, 0] in shares
    unused = [len(set(np.concatenate([train.module_idx[i] for i in w]))) < 4 for plan in plans for w in plan]
    assert any(unused)
    # a head a rank used only in a micro-step before its last (under DDP's no_sync) must still be all-reduced
    early_only = [
        set(np.concatenate([train.module_idx[i] for i in share[:-1]])) - set(train.module_idx[share[-1]])
        for plan in plans
        for w in plan
        for share in (Group(r, 2).share(w) for r in (0, 1))
        if len(share) > 1
    ]
    assert any(early_only)


def test_two_processes_take_the_steps_one_process_takes(launch, stage0, tmp_path, one_thread):
    one = reference(stage0, tmp_path / "one", EQUAL)
    records = launch["records"]
    two = records[0]["equal"]
    assert records[1]["equal"] == two  # every rank returns the same result
    assert [s["pairs"] for s in two["steps"]] == [s["pairs"] for s in one["steps"]]
    assert [s["lr"] for s in two["steps"]] == [s["lr"] for s in one["steps"]]
    np.testing.assert_allclose([s["loss"] for s in two["steps"]], [s["loss"] for s in one["steps"]], rtol=1e-4)
    np.testing.assert_allclose(
        [e["val_loss"] for e in two["history"]], [e["val_loss"] for e in one["history"]], rtol=1e-4
    )
    # both ranks held the same weights at every epoch's end, and they are one process's
    assert records[0]["weights"]["equal"] == records[1]["weights"]["equal"]
    ours, theirs = final_weights(launch["root"] / "equal"), final_weights(tmp_path / "one")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fp16_with_the_grad_scaler_matches_one_process(launch, stage0, tmp_path, one_thread):
    one = reference(stage0, tmp_path / "one", FP16)
    two = launch["records"][0]["fp16"]
    np.testing.assert_allclose([s["loss"] for s in two["steps"]], [s["loss"] for s in one["steps"]], rtol=1e-4)
    scaler = [
        json.loads((d / ft.SNAPSHOT_DIR / "state.json").read_text())["scaler"]["scale"]
        for d in (
            launch["root"] / "fp16",
            tmp_path / "one",
        )
    ]
    assert scaler[0] == scaler[1] < 2.0**16  # steps were skipped for overflow, the same ones
    assert launch["records"][0]["weights"]["fp16"] == launch["records"][1]["weights"]["fp16"]


def test_lora_with_checkpointing_trains_the_same_adapters_on_every_rank(launch):
    records = launch["records"]
    assert records[0]["lora"] == records[1]["lora"] and len(records[0]["lora"]["steps"]) > 0
    weights = records[0]["weights"]["lora"]
    assert weights == records[1]["weights"]["lora"] and weights[0] != weights[-1]  # equal on both, and trained


def test_resume_on_two_processes_ends_where_the_uninterrupted_run_does(launch):
    root = launch["root"]
    assert launch["records"][0]["stopped"] == "stopped"
    assert any(k.startswith("torch_rng.") for k in launch["records"][0]["snapshot_after_stop"])  # rank 1's RNG too
    full, resumed = final_weights(root / "full"), final_weights(root / "resumed")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    history = [json.loads((root / d / "finetune_history.json").read_text()) for d in ("full", "resumed")]
    assert history[0]["steps"] == history[1]["steps"]
    for a, b in zip(history[0]["epochs"], history[1]["epochs"], strict=True):
        assert a | {"seconds": 0} == b | {"seconds": 0}


def test_rank_zero_alone_writes_and_reports(launch):
    records = launch["records"]
    assert records[1]["writes"] == []
    written = {(run, kind, json.dumps(what)) for run, kind, what in records[0]["writes"]}
    assert ("equal", "write_json", '"finetune_history.json"') in written
    assert ("equal", "commit", json.dumps(["resume"])) in written
    from pipeline.atomic import JOURNAL, RETIRED, STAGING
    from pipeline.checkpoint import load_checkpoint

    for name in ("equal", "fp16", "full", "resumed"):
        folder = launch["root"] / name
        leftovers = [p.name for p in folder.iterdir() if p.name in (STAGING, RETIRED, JOURNAL) or ".tmp-" in p.name]
        assert leftovers == [], name
        assert load_checkpoint(folder).stage == 1
    out = launch["cli"].stdout
    assert out.count("checkpoint: ") == 1 and out.count("best epoch") == 1, out  # the summary, once


if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))
