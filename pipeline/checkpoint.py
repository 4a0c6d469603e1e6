"""Checkpoint folders: heads.safetensors + config.json (+ metrics.json; + encoder/ after stage 1).

Weights are safetensors and metadata JSON, so a checkpoint from anywhere is safe to open.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.atomic import check_settled, commit
from pipeline.config import Config, EncoderConfig, config_from_dict
from pipeline.data import Pair, file_sha256
from pipeline.encoder import Fingerprint, ModelInfo, describe, pick_device
from pipeline.errors import ModrmError
from pipeline.heads import RewardHeads

HEADS_FILE, CONFIG_FILE, METRICS_FILE, ENCODER_DIR = "heads.safetensors", "config.json", "metrics.json", "encoder"
FILE_ID = ("path", "sha256")  # what `trained_on` records of each data file


@dataclass
class Checkpoint:
    folder: Path
    model: RewardHeads
    config: Config  # the resolved config that trained it
    fingerprint: Fingerprint  # of the encoder whose embeddings the heads read
    stage: int
    cache: str | None  # the cache stage 0 trained from
    trained_on: list[dict]  # {"path", "sha256"} of every data file whose train and val pairs it learned from

    @property
    def encoder_folder(self) -> Path | None:
        """A fine-tuned encoder saved with the checkpoint (stage 1), else None: load by config.encoder.name."""
        folder = self.folder / ENCODER_DIR
        return folder if folder.is_dir() else None

    def run_on(self, device: str) -> torch.device:
        """Score on `device` (auto | cpu | cuda[:N]) whatever the checkpoint was trained on: the training device
        is a setting of that run, not of the model, so a GPU-trained checkpoint evaluates on a CPU."""
        resolved = pick_device(device)
        self.config.encoder.device = str(resolved)
        self.model.to(resolved)
        return resolved

    def encoder_info(self, encoder: EncoderConfig | None = None) -> ModelInfo:
        """The encoder whose embeddings the heads were trained on, or an error naming what differs. `encoder`: the
        run's own encoder settings where they differ from the saved ones (the run may trust remote code; a saved
        config never does)."""
        info = describe(encoder or self.config.encoder, folder=self.encoder_folder)
        if self.fingerprint.remote_code and not info.fingerprint.remote_code:
            raise ModrmError(
                f"checkpoint {self.folder}: its heads were trained on embeddings of the encoder folder's own Python "
                f"code, which runs only where this run sets encoder.trust_remote_code = true (a saved config never "
                f"turns it on); do so only if you trust {info.folder}"
            )
        diffs = info.fingerprint.differences(self.fingerprint)
        if diffs:
            raise ModrmError(
                f"checkpoint {self.folder}: encoder {self.config.encoder.name!r} is not the one its heads were "
                f"trained on ({'; '.join(diffs)})"
            )
        return info

    def check_modules(self, pairs: Sequence[Pair], data: str | Path) -> None:
        """Every pair needs a head for its module; name the first pair that has none."""
        known = set(self.model.module_names)
        for pair in pairs:
            if pair.target_module not in known:
                raise ModrmError(
                    f"{data}: pair_id {pair.pair_id!r}, field 'target_module': module {pair.target_module!r} has no "
                    f"head in checkpoint {self.folder} (its heads: {', '.join(self.model.module_names)})"
                )


def save_heads(
    folder: str | Path,
    model: RewardHeads,
    config: Config,
    fingerprint: Fingerprint,
    stage: int,
    cache: str | None,
    metrics: dict,
    trained_on: list[dict],
) -> None:
    """Replace the three files together (`commit`): a kill leaves the old checkpoint or the new one."""

    def write(staging: Path) -> None:
        write_heads(staging, model, config, fingerprint, stage, cache, metrics, trained_on)

    commit(folder, HEADS_FILES, write)


HEADS_FILES = [HEADS_FILE, METRICS_FILE, CONFIG_FILE]


def write_heads(
    folder: Path,
    model: RewardHeads,
    config: Config,
    fingerprint: Fingerprint,
    stage: int,
    cache: str | None,
    metrics: dict,
    trained_on: list[dict],
) -> None:
    """The heads' files, written plainly into `folder` (a staging folder of `commit`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / HEADS_FILE))
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    (folder / CONFIG_FILE).write_text(
        json.dumps(
            {
                "stage": stage,
                "modules": model.module_names,
                "dim": model.dim,
                "heads": config.to_dict()["heads"],
                "encoder": fingerprint.to_dict(),
                "cache": cache,
                "trained_on": trained_on,
                "config": config.to_dict(),
            },
            indent=2,
        )
        + "\n"
    )


def heads_version(folder: str | Path) -> str:
    """A checkpoint's heads as a served version's name: `base-` and the first 12 hex digits of their file's
    sha256 (the same heads, the same name; what a reload of a retrained folder changes)."""
    return f"base-{file_sha256(Path(folder) / HEADS_FILE)[:12]}"


def read_checkpoint_config(folder: str | Path) -> tuple[dict, Config]:
    """config.json's metadata and the resolved config that trained the checkpoint (no weights read). Reading
    writes nothing: a save interrupted part way is an error, finished by its writer (`atomic.recover`)."""
    folder = Path(folder)
    if folder.is_dir():
        check_settled(folder, [*HEADS_FILES, ENCODER_DIR])
    for name in (CONFIG_FILE, HEADS_FILE):
        if not (folder / name).is_file():
            raise ModrmError(f"checkpoint {folder}: missing {name} (train one with `modrm train-heads`)")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        return meta, config_from_dict(meta["config"], str(folder / CONFIG_FILE))
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        raise ModrmError(f"checkpoint {folder}: {CONFIG_FILE} is malformed ({err})") from None


def load_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> Checkpoint:
    """Read a checkpoint, refusing one whose files are missing or damaged, or whose weights do not match its
    config (compared on shapes before any weight is allocated, so a hostile config cannot exhaust memory).
    `trust_remote_code`: this run lets the encoder folder's own Python files run (a saved config never does)."""
    folder = Path(folder)
    meta, config = read_checkpoint_config(folder)
    config.encoder.trust_remote_code = trust_remote_code
    try:
        fingerprint = Fingerprint(**meta["encoder"])
        modules, dim = meta["modules"], meta["dim"]
        if not (isinstance(modules, list) and modules and all(isinstance(m, str) and m for m in modules)):
            raise ValueError(f"modules must be a list of names, got {modules!r:.60}")
        if len(set(modules)) != len(modules) or isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"modules {modules} and dim {dim!r}: names must be unique and dim a positive integer")
        stage, cache = meta.get("stage", 0), meta.get("cache")
        if type(stage) is not int or stage not in (0, 1):
            raise ValueError(f"stage {stage!r:.40} is not 0 or 1")
        if cache is not None and not isinstance(cache, str):
            raise ValueError(f"cache must be a folder name, got {type(cache).__name__}")
        trained_on = meta.get("trained_on", [])
        if not isinstance(trained_on, list):
            raise ValueError(f"trained_on must be a list, got {type(trained_on).__name__}")
        trained_on = [t for t in trained_on if isinstance(t, dict) and all(isinstance(t.get(k), str) for k in FILE_ID)]
        with torch.device("meta"):  # shapes only: nothing allocated until the file agrees
            expected = {k: tuple(v.shape) for k, v in RewardHeads(modules, dim, config.heads).state_dict().items()}
    except (KeyError, TypeError, ValueError) as err:
        raise ModrmError(f"checkpoint {folder}: {CONFIG_FILE} is malformed ({err})") from None
    try:
        with safe_open(str(folder / HEADS_FILE), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
            if expected != found:
                diff = sorted(set(expected.items()) ^ set(found.items()))[:3]
                raise ModrmError(
                    f"checkpoint {folder}: {HEADS_FILE} does not match modules {modules} and dim {dim} in "
                    f"{CONFIG_FILE} (first differences: {diff})"
                )
            state = {k: f.get_tensor(k) for k in found}
    except SafetensorError as err:
        raise ModrmError(f"checkpoint {folder}: {HEADS_FILE} is not a readable safetensors file ({err})") from None
    model = RewardHeads(modules, dim, config.heads)
    model.load_state_dict(state)
    return Checkpoint(folder, model.to(device).eval(), config, fingerprint, stage, cache, trained_on)
