"""Atomic writes: a reader (or a killed run) sees the old file or the new one, never half of one; and
`commit`, which replaces several files and folders together with the same promise.

Folders written here may come from elsewhere (a downloaded checkpoint), so nothing written, moved or deleted
follows a symbolic link: a link where modrm writes is refused, and a commit's journal names only plain entries
of its own folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ModrmError


def refuse_link(path: Path) -> None:
    """A symbolic link where modrm writes could send the write anywhere: refused, naming it."""
    if path.is_symlink():
        raise ModrmError(f"{path}: is a symbolic link; modrm writes only plain files and folders (remove the link)")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    refuse_link(path)
    if path.is_dir():
        raise ModrmError(f"{path}: is a folder; name a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover (or a planted link) is never written through
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
_REPAIR = "modrm never writes one like it: remove it, then run the command that wrote the folder again"


def commit(folder: str | Path, names: list[str], write: Callable[[Path], Any], remove: Sequence[str] = ()) -> None:
    """Replace the files and folders `names` of `folder` together: `write(staging)` fills a staging folder with
    their new versions; a journal naming them (written atomically) is the commit point; then each is moved into
    place. `recover` finishes a commit a kill interrupted after its journal, or discards one before it, so a kill
    at any instant leaves the whole old set or the whole new one. `remove`: entries of the old set the new one
    does not have, journaled with the rest and removed in the same commit."""
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
    write_json(folder / JOURNAL, [*names, *remove])
    recover(folder)


def recover(folder: str | Path) -> None:
    """For the folder's writer only (a reader never writes into what it reads; see `check_settled`): bring
    `folder` to a committed state, rolling a journaled commit forward and dropping an unjournaled one."""
    folder = Path(folder)
    staging, retired, journal = folder / STAGING, folder / RETIRED, folder / JOURNAL
    for path in (staging, retired, journal):
        refuse_link(path)
    names = read_journal(folder)
    if names is not None:
        for name in names:  # all checked before anything moves
            for path in (staging / name, folder / name, retired / name):
                refuse_link(path)
        retired.mkdir(exist_ok=True)
        for name in names:
            if _exists(staging / name):  # not yet moved: retire the old one, move the new one in
                if _exists(folder / name):
                    os.replace(folder / name, retired / name)
                elif not _exists(retired / name):
                    (retired / name).mkdir()  # marks the move made: a moved entry is never taken for a removal
                os.replace(staging / name, folder / name)
            elif _exists(folder / name) and not _exists(retired / name):  # journaled without a new version
                os.replace(folder / name, retired / name)
        journal.unlink()
    for leftover in (staging, retired):
        if _exists(leftover):
            shutil.rmtree(leftover)


def read_journal(folder: Path) -> list[str] | None:
    """The names a commit of `folder` journaled (None: no commit pending): plain entries of the folder only,
    so a journal can name nothing outside it."""
    journal = folder / JOURNAL
    if not _exists(journal):
        return None
    refuse_link(journal)
    try:
        names = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ModrmError(f"{journal}: a damaged commit journal ({err!s:.200}); {_REPAIR}") from None
    if not isinstance(names, list):
        raise ModrmError(f"{journal}: a damaged commit journal (a {type(names).__name__}, not a list); {_REPAIR}")
    bad = next((n for n in names if not (isinstance(n, str) and _plain_name(n))), None)
    if bad is not None:
        shown = f"{bad!r:.80}" if isinstance(bad, str | int | float | bool) else f"a {type(bad).__name__}"
        raise ModrmError(f"{journal}: a damaged commit journal (names {shown}, not a plain name); {_REPAIR}")
    return names


def check_settled(folder: str | Path, names: Sequence[str]) -> None:
    """For readers: a folder whose commit of any of `names` was interrupted between its moves holds part of the
    old set and part of the new, which no reader may take for either. Nothing is written; a commit journaled but
    not begun (the old set whole) or fully moved (the new set whole) reads as it is. An entry is done once
    `recover` has put something at .retired/<name> (its old version, or a mark), and waits while it has a new
    version in staging or an old one it has yet to retire."""
    folder = Path(folder)
    journaled = [n for n in read_journal(folder) or () if n in names]
    done = [n for n in journaled if _exists(folder / RETIRED / n)]
    waiting = [n for n in journaled if _exists(folder / STAGING / n) or (n not in done and _exists(folder / n))]
    if done and waiting:
        raise ModrmError(
            f"{folder}: a save was interrupted part way ({JOURNAL} names {', '.join(journaled)}); run the command "
            "that wrote it again with the same output folder: it finishes the save first"
        )


def _plain_name(name: str) -> bool:
    """An entry of the folder itself: no separator, no `..`, not absolute, not one of the commit's own."""
    return name not in ("", ".", "..", STAGING, RETIRED, JOURNAL) and not any(c in name for c in ("/", os.sep, "\0"))


def _exists(path: Path) -> bool:
    """Whether anything, a link included, is at `path` (without following it)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if stat.S_ISREG(os.lstat(path).st_mode):
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
