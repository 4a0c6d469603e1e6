"""`modrm score`: per-module rewards for raw agent trajectories (the RL side of modrm).

Input: JSON lines (or a JSON array) of {"id": ..., "task": ..., "trajectory": "Round 1: <reflection>..."}.
Each trajectory is split into module views by the tag parser, every unique text is encoded once, and each
module's head scores (task + trajectory, that module's view). Output: one JSON line per input record,
{"id": ..., "rewards": {"planner": 0.73, ...}}; a module absent from a trajectory gets null.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_write
from pipeline.checkpoint import load_checkpoint
from pipeline.encoder import Encoder
from pipeline.errors import ModrmError
from pipeline.trajectory import module_view


def read_trajectories(path: Path) -> list[dict]:
    """Records of a JSON array or JSON lines; a problem names the file, the record (index) and the field."""
    text = path.read_text(encoding="utf-8") if path.is_file() else None
    if text is None:
        raise ModrmError(f"{path}: no such file")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModrmError(f"{path}: malformed JSON ({err})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ModrmError(f"{path}: record {len(records)} (line {number}): malformed JSON ({err})") from None
    if not records:
        raise ModrmError(f"{path}: holds no records (expected JSON lines of {{id, task, trajectory}})")
    for i, record in enumerate(records):
        for field in ("task", "trajectory"):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ModrmError(f"{path}: record {i}, field '{field}': missing or not a string")
    return records


def score_file(checkpoint: Path, input_path: Path, out_path: Path, device: str = "auto", progress: bool = True) -> int:
    """Score every trajectory under every head; returns the number of records written."""
    ckpt = load_checkpoint(checkpoint)
    records = read_trajectories(input_path)
    config = ckpt.config
    device = ckpt.run_on(device)
    encoder = Encoder.load(config.encoder, ckpt.encoder_info())
    modules = ckpt.model.module_names
    contexts = [config.encoder.context_text(r["task"], r["trajectory"]) for r in records]
    heads = dict(zip(contexts, (config.encoder.context_head(r["task"]) for r in records), strict=True))
    views = [[module_view(r["trajectory"], m) for m in modules] for r in records]
    ctx_unique = list(heads)
    mod_unique = list(dict.fromkeys(v for row in views for v in row if v))
    ctx_emb = encoder.encode(ctx_unique, "context", heads=list(heads.values()), progress=progress)
    mod_emb = encoder.encode(mod_unique, "module", progress=progress) if mod_unique else np.zeros((0, encoder.dim))
    ctx_row = {t: i for i, t in enumerate(ctx_unique)}
    mod_row = {t: i for i, t in enumerate(mod_unique)}
    # each unique (context, view, module) is scored once, so duplicate trajectories get bit-identical rewards
    slot_of = {}
    for r in range(len(records)):
        for m in range(len(modules)):
            if views[r][m]:
                slot_of.setdefault((ctx_row[contexts[r]], mod_row[views[r][m]], m), len(slot_of))
    rewards = np.full((len(records), len(modules)), np.nan)
    if slot_of:
        c_idx, v_idx, m_idx = map(np.array, zip(*slot_of, strict=True))
        with torch.inference_mode():
            unique = (
                ckpt.model(
                    torch.from_numpy(ctx_emb[c_idx]).to(device),
                    torch.from_numpy(mod_emb[v_idx]).to(device),
                    torch.from_numpy(m_idx),
                )
                .cpu()
                .numpy()
            )
        for r in range(len(records)):
            for m in range(len(modules)):
                if views[r][m]:
                    rewards[r, m] = unique[slot_of[(ctx_row[contexts[r]], mod_row[views[r][m]], m)]]
    lines = [
        json.dumps(
            {
                "id": rec.get("id", i),
                "rewards": {m: (None if np.isnan(x) else float(x)) for m, x in zip(modules, rewards[i], strict=True)},
            }
        )
        for i, rec in enumerate(records)
    ]
    atomic_write(out_path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return len(records)
