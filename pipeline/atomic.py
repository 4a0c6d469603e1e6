"""Atomic writes: a reader (or a killed run) sees the old file or the new one, never half of one; and
`commit`, which replaces several files and folders together with the same promise."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ModrmError


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    if path.is_dir():
        raise ModrmError(f"{path}: is a folder; name a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


# ---------------------------------------------------------------------------------------------- several at once

STAGING, RETIRED, JOURNAL = ".staging", ".retired", ".commit"


def commit(folder: str | Path, names: list[str], write: Callable[[Path], Any]) -> None:
    """Replace the files and folders `names` of `folder` together: `write(staging)` fills a staging folder with
    their new versions; a journal naming them (written atomically) is the commit point; then each is moved into
    place. `recover` finishes a commit a kill interrupted after its journal, or discards one before it, so a kill
    at any instant leaves the whole old set or the whole new one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover(folder)
    staging = folder / STAGING
    staging.mkdir()
    write(staging)
    missing = [n for n in names if not (staging / n).exists()]
    if missing:
        raise RuntimeError(f"commit: the writer left out {missing}")
    _fsync_tree(staging)
    write_json(folder / JOURNAL, names)
    recover(folder)


def recover(folder: str | Path) -> None:
    """Bring `folder` to a committed state: roll a journaled commit forward, drop an unjournaled one."""
    folder = Path(folder)
    staging, retired, journal = folder / STAGING, folder / RETIRED, folder / JOURNAL
    if journal.exists():
        retired.mkdir(exist_ok=True)
        for name in json.loads(journal.read_text()):
            if (staging / name).exists():  # not yet moved: retire the old one, move the new one in
                if (folder / name).exists():
                    os.replace(folder / name, retired / name)
                os.replace(staging / name, folder / name)
        journal.unlink()
    for leftover in (staging, retired):
        if leftover.exists():
            shutil.rmtree(leftover)


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
