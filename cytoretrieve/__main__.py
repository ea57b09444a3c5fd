"""`python -m cytoretrieve ...` = the `cytoretrieve` command (what `torchrun -m cytoretrieve` runs per process)."""

from cytoretrieve.cli import main

main()
