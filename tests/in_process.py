"""`modrm` run in the test's own process, as a user runs it: for command-line tests that need no fresh interpreter
(each fresh one pays seconds of imports)."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from pipeline.cli import main


def modrm(*args: str | Path) -> tuple[int, str, str]:
    """`modrm ARGS` through `cli.main`: (exit code, stdout, stderr)."""
    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = ["modrm", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()
