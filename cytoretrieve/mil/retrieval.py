"""The training-free retrieval score: no model is trained, only FAISS searches over stored vectors.

For a fold, two reference sets are indexed (cosine similarity: L2-normalised vectors, exact inner product):
- positives: annotated positive cell / tile vectors (`positives`), or, when none are given, every instance of
  the positive training bags (noisy: most tiles of a positive slide are normal);
- negatives: every instance of the negative training bags (a negative slide's tiles are all negative).

Tile score = mean similarity to its `k` nearest positives - mean similarity to its `k` nearest negatives.
Slide score = mean of its `top_m` highest tile scores (all of them when it has fewer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cytoretrieve.mil.bags import Bags


@dataclass
class RetrievalConfig:
    k: int = 10
    top_m: int = 10
    query_batch: int = 65_536

    def to_dict(self) -> dict:
        return asdict(self)


def slide_score(tile_scores: np.ndarray, top_m: int) -> float:
    """Mean of the `top_m` highest tile scores."""
    s = np.sort(np.asarray(tile_scores, dtype=np.float64))[::-1]
    return float(s[: max(1, top_m)].mean()) if len(s) else float("nan")


class RetrievalScorer:
    def __init__(self, positives: np.ndarray, negatives: np.ndarray, config: RetrievalConfig) -> None:
        from cytoretrieve.index import build

        self.config = config
        self.pos, _ = build(positives, np.arange(len(positives)), "auto")
        self.neg, _ = build(negatives, np.arange(len(negatives)), "auto")
        self.k_pos = min(config.k, len(positives))
        self.k_neg = min(config.k, len(negatives))

    def tile_scores(self, vectors: np.ndarray) -> np.ndarray:
        from cytoretrieve.knn import l2_normalise

        out = []
        for a in range(0, len(vectors), self.config.query_batch):
            q = l2_normalise(vectors[a:a + self.config.query_batch])
            sp, _ = self.pos.search(q, self.k_pos)
            sn, _ = self.neg.search(q, self.k_neg)
            out.append(sp.mean(1) - sn.mean(1))
        return np.concatenate(out) if out else np.zeros(0)

    def predict(self, vectors: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(slide scores, tile scores per slide)."""
        tiles = [self.tile_scores(v) for v in vectors]
        return np.array([slide_score(t, self.config.top_m) for t in tiles]), tiles


def fit_retrieval(bags: Bags, positives: np.ndarray | None = None, config: RetrievalConfig | None = None) -> RetrievalScorer:
    """Index the references of the training `bags` (and the annotated `positives`, when given)."""
    cfg = config or RetrievalConfig()
    neg = [v for v, y in zip(bags.vectors, bags.y) if y == 0]
    if positives is None or len(positives) == 0:
        positives = np.concatenate([v for v, y in zip(bags.vectors, bags.y) if y == 1])
    return RetrievalScorer(np.asarray(positives, dtype=np.float32), np.concatenate(neg).astype(np.float32), cfg)
