"""`modrm` run in the test's own process, as a user runs it: for command-line tests that need no fresh interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.cli import main


def modrm(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """`modrm ARGS` through `cli.main`: (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["modrm", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err
