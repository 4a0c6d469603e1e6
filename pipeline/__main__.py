"""`python -m pipeline ...`: the `modrm` command where its console script is not on the PATH."""

from pipeline.cli import main

main()
