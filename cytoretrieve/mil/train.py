"""Training a MIL model on bags: padded mini-batches, Adam, BCE on bag logits (positives weighted by
n_negative / n_positive), CPU or GPU.

Cytology-aware option: `instance_negatives` > 0 adds, for every negative bag of a batch, the BCE of each of its
instance logits against 0 (every tile of a negative slide is a negative instance), weighted by that factor.

Features are standardised with the mean / std of the training instances (`standardise=True`, the default); the
fitted `MILScorer` applies the same transform at inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cytoretrieve.mil.bags import Bags


@dataclass
class TrainConfig:
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
    max_instances: int = 8192  # training bags larger than this are subsampled (each epoch anew)
    standardise: bool = True
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from cytoretrieve.errors import CytoError

        raise CytoError("--device cuda: no CUDA device is available")
    return device


class MILScorer:
    """A trained model with its feature standardisation: `predict(bags)` -> (bag probabilities, instance scores)."""

    def __init__(self, model, mean: np.ndarray, std: np.ndarray, device: str) -> None:  # noqa: ANN001
        self.model, self.mean, self.std, self.device = model, mean, std, device

    def _prep(self, v: np.ndarray) -> np.ndarray:
        return (np.asarray(v, dtype=np.float32) - self.mean) / self.std

    def predict(self, vectors: list[np.ndarray], batch_size: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
        import torch

        from cytoretrieve.mil.models import pad

        self.model.eval()
        probs: list[float] = []
        inst: list[np.ndarray] = []
        with torch.no_grad():
            for a in range(0, len(vectors), batch_size):
                chunk = [self._prep(v) for v in vectors[a:a + batch_size]]
                x, mask = pad(chunk, self.device)
                bag, scores, _ = self.model(x, mask)
                probs.extend(torch.sigmoid(bag).cpu().numpy().tolist())
                s = scores.cpu().numpy()
                inst.extend(s[i, : len(c)].copy() for i, c in enumerate(chunk))
        return np.asarray(probs, dtype=np.float64), inst


def fit(bags: Bags, config: TrainConfig | None = None) -> MILScorer:
    """Train a MIL model on `bags` (both classes needed) and return its scorer."""
    import torch

    from cytoretrieve.mil.models import MILModel, pad

    cfg = config or TrainConfig()
    device = resolve_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.standardise:
        total = sum(len(v) for v in bags.vectors)
        s1 = sum(v.astype(np.float64).sum(0) for v in bags.vectors)
        s2 = sum((v.astype(np.float64) ** 2).sum(0) for v in bags.vectors)
        mean = s1 / total
        std = np.sqrt(np.maximum(s2 / total - mean**2, 0)) + 1e-6
    else:
        mean, std = np.zeros(bags.dim), np.ones(bags.dim)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    data = bags.vectors  # standardised batch by batch: no second copy of every vector
    y = bags.y.astype(np.float32)
    n_pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - n_pos) / max(n_pos, 1.0), device=device)

    model = MILModel(bags.dim, cfg.method, cfg.hidden, cfg.attention, cfg.layers, cfg.dropout, cfg.top_k).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(data))
        for a in range(0, len(order), cfg.batch_size):
            idx = order[a:a + cfg.batch_size]
            chunk = []
            for i in idx:
                v = data[i]
                if len(v) > cfg.max_instances:
                    v = v[np.sort(rng.choice(len(v), cfg.max_instances, replace=False))]
                chunk.append((np.asarray(v, dtype=np.float32) - mean) / std)
            x, mask = pad(chunk, device)
            target = torch.as_tensor(y[idx], device=device)
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
