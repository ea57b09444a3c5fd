"""Training a MIL model on bags: padded mini-batches, Adam, BCE on bag logits (positives weighted by
n_negative / n_positive), CPU or GPU.

Cytology-aware options:
- `instance_negatives` > 0 adds, for every negative bag of a batch, the BCE of each of its instance logits against
  0 (every tile of a negative slide is a negative instance), weighted by that factor.
- `augment_positives` = p > 0 (needs annotated positive vectors): each epoch, each negative training bag is, with
  probability p, also added as a positive bag holding 1..`augment_max` annotated positive cells or tiles at random
  places among its own instances. A Pap smear is positive when a few cells are, so a negative slide plus a few
  abnormal cells is a realistic positive; it gives the model positives whose evidence is known, where the real
  positive slides hide a handful of abnormal tiles among thousands.

Features are standardised with the mean / std of the training instances (`standardise=True`, the default); the
fitted `MILScorer` applies the same transform at inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cytoretrieve.queries.mil.bags import Bags
from cytoretrieve.runtime import resolve_device


@dataclass
class MILTrainConfig:
    method: str = "abmil"
    hidden: int = 128
    attention: int = 64
    layers: int = 1
    dropout: float = 0.25
    top_k: int = 4
    epochs: int = 40
    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 16
    instance_negatives: float = 0.0  # weight of the instance-level loss on negative bags' instances (0 = off)
    augment_positives: float = 0.0  # probability a negative bag is also trained on as an augmented positive
    augment_max: int = 4  # annotated positives inserted into an augmented bag: 1 to this many
    max_instances: int = 8192  # training bags larger than this are subsampled (each epoch anew)
    standardise: bool = True
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


class MILScorer:
    """A trained model with its feature standardisation: `predict(bags)` -> (bag probabilities, instance scores)."""

    def __init__(self, model, mean: np.ndarray, std: np.ndarray, device: str) -> None:  # noqa: ANN001
        self.model, self.mean, self.std, self.device = model, mean, std, device

    def predict(self, vectors: list[np.ndarray], batch_size: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
        import torch

        from cytoretrieve.queries.mil.models import pad

        self.model.eval()
        probs: list[float] = []
        inst: list[np.ndarray] = []
        with torch.inference_mode():
            for a in range(0, len(vectors), batch_size):
                chunk = vectors[a:a + batch_size]
                x, mask = pad(chunk, self.device, self.mean, self.std)
                bag, scores, _ = self.model(x, mask)
                probs.extend(torch.sigmoid(bag).cpu().numpy().tolist())
                s = scores.cpu().numpy()
                inst.extend(s[i, : len(c)].copy() for i, c in enumerate(chunk))
        return np.asarray(probs, dtype=np.float64), inst


def _standardisation(bags: Bags) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of every training instance, in one pass over the bags (float64 sums)."""
    total, s1, s2 = 0, np.zeros(bags.dim), np.zeros(bags.dim)
    for v in bags.vectors:
        v = np.asarray(v, dtype=np.float64)
        total += len(v)
        s1 += v.sum(0)
        s2 += (v**2).sum(0)
    mean = s1 / max(total, 1)
    return mean.astype(np.float32), (np.sqrt(np.maximum(s2 / max(total, 1) - mean**2, 0)) + 1e-6).astype(np.float32)


def augmented_bag(negative: np.ndarray, positives: np.ndarray, most: int, rng: np.random.Generator) -> np.ndarray:
    """A negative bag with 1..`most` annotated positive instances inserted at random places."""
    m = int(rng.integers(1, max(1, min(most, len(positives))) + 1))
    inserted = positives[rng.choice(len(positives), m, replace=False)]
    at = rng.integers(0, len(negative) + 1, size=m)
    return np.insert(np.asarray(negative), at, inserted, axis=0)


def fit(bags: Bags, config: MILTrainConfig | None = None, positives: np.ndarray | None = None) -> MILScorer:
    """Train a MIL model on `bags` and return its scorer. Both classes are needed, unless positive-bag
    augmentation (`config.augment_positives` with annotated `positives`) makes the positive ones."""
    import torch

    from cytoretrieve.errors import CytoError
    from cytoretrieve.queries.mil.models import MILModel, pad

    cfg = config or MILTrainConfig()
    augment = cfg.augment_positives > 0
    if augment and (positives is None or not len(positives)):
        raise CytoError("positive-bag augmentation needs annotated positive vectors (`positives` TABLE)")
    device = resolve_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    mean, std = _standardisation(bags) if cfg.standardise else (np.zeros(bags.dim, np.float32), np.ones(bags.dim, np.float32))
    data = bags.vectors  # standardised batch by batch: no second copy of every vector
    y = bags.y.astype(np.float32)
    negatives = np.flatnonzero(y == 0)
    pos = np.asarray(positives, dtype=np.float32) if augment else None

    model = MILModel(bags.dim, cfg.method, cfg.hidden, cfg.attention, cfg.layers, cfg.dropout, cfg.top_k).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(cfg.epochs):
        model.train()
        # this epoch's bags: (index into data, label, augmented?); augmented copies of negatives are positives
        extra = negatives[rng.random(len(negatives)) < cfg.augment_positives] if augment else negatives[:0]
        epoch = [(int(i), float(y[i]), False) for i in range(len(data))] + [(int(i), 1.0, True) for i in extra]
        labels = np.array([t for _, t, _ in epoch], dtype=np.float32)
        n_pos = float(labels.sum())
        pos_weight = torch.tensor((len(labels) - n_pos) / max(n_pos, 1.0), device=device)
        order = rng.permutation(len(epoch))
        for a in range(0, len(order), cfg.batch_size):
            idx = order[a:a + cfg.batch_size]
            chunk = []
            for j in idx:
                i, _, augmented = epoch[j]
                v = data[i]
                if len(v) > cfg.max_instances:
                    v = v[np.sort(rng.choice(len(v), cfg.max_instances, replace=False))]
                if augmented:
                    v = augmented_bag(v, pos, cfg.augment_max, rng)
                chunk.append(v)
            x, mask = pad(chunk, device, mean, std)  # standardised as it is copied into the batch
            target = torch.as_tensor(labels[idx], device=device)
            bag, _, inst = model(x, mask)
            loss = bce(bag, target, pos_weight=pos_weight)
            if cfg.instance_negatives > 0:
                neg = (target == 0).unsqueeze(1) & mask
                if neg.any():
                    loss = loss + cfg.instance_negatives * bce(inst[neg], torch.zeros_like(inst[neg]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return MILScorer(model, mean, std, device)
