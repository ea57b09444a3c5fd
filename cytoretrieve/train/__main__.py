"""`python -m cytoretrieve.train ARGS` = `cytoretrieve train ARGS`, for launchers that take a module:
`torchrun --nproc_per_node 8 -m cytoretrieve.train --data tiles --recipe vit_small --out runs/vits`."""

import sys

from cytoretrieve.cli import run

if __name__ == "__main__":
    sys.exit(run(["train", *sys.argv[1:]]))
