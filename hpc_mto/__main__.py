"""``python -m hpc_mto``: the hpc-mto command line, for environments without the console script."""

from .cli import main

main()
