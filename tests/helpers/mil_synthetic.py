"""Tiny synthetic bags for the MIL tests: the positive instances are known."""

from __future__ import annotations

import numpy as np

from cytoretrieve.queries.mil.bags import Bags


def synthetic_bags(n: int = 60, dim: int = 16, shift: float = 5.0, seed: int = 0) -> tuple[Bags, list[np.ndarray]]:
    """`n` bags alternating negative / positive, 8-19 Gaussian instances each; a positive bag has 1-2 instances
    shifted by `shift` along axis 0. Returns the bags and, per bag, the boolean mask of its positive instances."""
    rng = np.random.default_rng(seed)
    names, y, vectors, masks = [], [], [], []
    for i in range(n):
        label = i % 2
        size = int(rng.integers(8, 20))
        x = rng.normal(size=(size, dim)).astype(np.float32)
        mask = np.zeros(size, dtype=bool)
        if label:
            mask[rng.choice(size, int(rng.integers(1, 3)), replace=False)] = True
            x[mask, 0] += shift
        names.append(f"slide-{i:03d}")
        y.append(label)
        vectors.append(x)
        masks.append(mask)
    return Bags(names=names, y=np.array(y, dtype=np.int8), vectors=vectors), masks
