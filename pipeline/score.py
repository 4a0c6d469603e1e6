"""`modrm score`: per-module rewards for raw agent trajectories (the RL side of modrm).

Input: JSON lines (or a JSON array) of {"id": ..., "task": ..., "trajectory": "Round 1: <reflection>..."}.
Scoring is `RewardModel.score` (pipeline/reward.py): each trajectory is split into module views by the tag
parser, every unique text is encoded once, and each module's head scores (task + trajectory, that module's
view). Output: one JSON line per input record, {"id": ..., "rewards": {"planner": 0.73, ...}}; a module
absent from a trajectory gets null, and "warnings" lists what the parser tolerated (an unclosed tag, say).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import atomic_write
from pipeline.data import JsonRecords, lone_surrogate
from pipeline.errors import ModrmError
from pipeline.trajectory import parse_trajectory


def read_trajectories(path: Path) -> list[dict]:
    """Records of a JSON array or JSON lines; a problem names the file, the record (index) and the field."""
    records = []
    for record in JsonRecords(path):
        if record.problem is not None:
            where = f"record {record.index}" + (f" (line {record.line})" if record.line is not None else "")
            raise ModrmError(f"{path}: {where}: {record.problem}")
        records.append(record.value)
    if not records:
        raise ModrmError(f"{path}: holds no records (expected JSON lines of {{id, task, trajectory}})")
    for i, record in enumerate(records):
        for field in ("task", "trajectory"):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ModrmError(f"{path}: record {i}, field '{field}': missing or not a string")
            if surrogate := lone_surrogate(record[field]):
                raise ModrmError(f"{path}: record {i}, field '{field}': {surrogate}, which is not text")
    return records


def score_file(
    checkpoint: Path,
    input_path: Path,
    out_path: Path,
    device: str = "auto",
    progress: bool = True,
    trust_remote_code: bool = False,
) -> int:
    """Score every trajectory under every head; returns the number of records written."""
    from pipeline.reward import RewardModel

    records = read_trajectories(input_path)
    rm = RewardModel.load(checkpoint, device, trust_remote_code=trust_remote_code)
    rewards = rm.score(records, progress=progress)
    lines = []
    for i, (record, reward) in enumerate(zip(records, rewards, strict=True)):
        warnings = parse_trajectory(record["trajectory"]).warnings  # what the parser tolerated, for the user
        line = {"id": record.get("id", i), "rewards": reward} | ({"warnings": warnings} if warnings else {})
        lines.append(json.dumps(line))
    atomic_write(out_path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return len(records)
