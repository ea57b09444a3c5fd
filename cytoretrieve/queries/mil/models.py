"""MIL models over padded mini-batches of bags: x (B, N, D) with a mask (B, N) of real instances.

Every model is `encoder -> pooling -> classifier`:
- encoder: one Linear + ReLU (+ dropout) per width of `encoder` (one layer of 128 by default; (256, 128) is the
  two-layer instance network of the MIL-benchmark literature, no better here: BENCHMARKS.md);
- pooling:
  - `abmil`: attention pooling of Ilse et al. 2018, a_i = softmax_i(w^T tanh(V h_i));
  - `gated`: gated attention, a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)));
  - `mean`, `max`: embedding-level mean / max over the bag's instances;
  - `topk`: instance-level pooling, the bag logit is the mean of its k highest instance logits;
- classifier: Linear(hidden, 1), one logit per bag.

`forward` returns (bag logits (B,), instance scores (B, N)): the attention weights for abmil/gated, else the
classifier applied to each instance embedding (its logit). `instance_logits` (the classifier on each instance
embedding) is what the instance-level negatives of `train.py` are trained on, for every method.

The poolings are a registry, `POOLINGS` (name -> function of the model, instance embeddings, mask and instance
logits); a pooling scored by `cytoretrieve score` also needs its record in `methods.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

NEG_INF = -1e9
ATTENTION = ("abmil", "gated")  # the poolings with attention layers (gated: also the gate U)


class MILModel(nn.Module):
    def __init__(self, dim: int, method: str = "abmil", encoder: Sequence[int] = (128,), attention: int = 64,
                 dropout: float = 0.25, top_k: int = 4) -> None:
        super().__init__()
        if method not in POOLINGS:
            raise ValueError(f"unknown MIL method '{method}' (one of {', '.join(POOLINGS)})")
        if not encoder:
            raise ValueError("`encoder` needs at least one layer width")
        self.method, self.top_k = method, top_k
        enc: list[nn.Module] = []
        d = dim
        for width in encoder:
            # in-place ReLU: the Linear's output is not needed for its backward, so one (B, N, width) tensor less
            enc += [nn.Linear(d, int(width)), nn.ReLU(inplace=True)]
            if dropout > 0:
                enc.append(nn.Dropout(dropout))
            d = int(width)
        self.encoder = nn.Sequential(*enc)
        hidden = d
        if method in ATTENTION:
            self.att_v = nn.Linear(hidden, attention)
            self.att_w = nn.Linear(attention, 1)
            if method == "gated":
                self.att_u = nn.Linear(hidden, attention)
        self.classifier = nn.Linear(hidden, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def instance_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The classifier on each instance embedding: (B, N)."""
        return self.classifier(h).squeeze(-1)

    def attention(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.att_v(h))
        if self.method == "gated":
            a = a * torch.sigmoid(self.att_u(h))
        a = self.att_w(a).squeeze(-1).masked_fill(~mask, NEG_INF)
        return torch.softmax(a, dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bag logits (B,), instance scores (B, N), instance logits (B, N)); padded positions score 0 / -1e9."""
        h = self.embed(x)
        inst = self.instance_logits(h)
        bag, scores = POOLINGS[self.method](self, h, mask, inst)
        return bag, scores, inst


Pooling = Callable[[MILModel, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _attention_pool(model: MILModel, h: torch.Tensor, mask: torch.Tensor,
                    inst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """abmil / gated: the attention-weighted mean embedding; the instance scores are the attention weights."""
    a = model.attention(h, mask)
    pooled = torch.bmm(a.unsqueeze(1), h).squeeze(1)  # sum_i a_i h_i without a (B, N, hidden) product
    return model.classifier(pooled).squeeze(-1), a


def _mean_pool(model: MILModel, h: torch.Tensor, mask: torch.Tensor,
               inst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.unsqueeze(-1).to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
    return model.classifier(pooled).squeeze(-1), inst.masked_fill(~mask, NEG_INF)


def _max_pool(model: MILModel, h: torch.Tensor, mask: torch.Tensor,
              inst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pooled = h.masked_fill(~mask.unsqueeze(-1), NEG_INF).amax(1)
    return model.classifier(pooled).squeeze(-1), inst.masked_fill(~mask, NEG_INF)


def _topk_pool(model: MILModel, h: torch.Tensor, mask: torch.Tensor,
               inst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of the k highest instance logits among the real instances."""
    k = min(model.top_k, inst.shape[1])
    top, idx = inst.masked_fill(~mask, NEG_INF).topk(k, dim=1)
    valid = mask.gather(1, idx).to(top.dtype)
    return (top * valid).sum(1) / valid.sum(1).clamp_min(1), inst.masked_fill(~mask, NEG_INF)


# name -> (bag logits (B,), instance scores (B, N)); padded instances score NEG_INF (attention: weight 0)
POOLINGS: dict[str, Pooling] = {"abmil": _attention_pool, "gated": _attention_pool, "mean": _mean_pool,
                                "max": _max_pool, "topk": _topk_pool}


def pad(bags: Sequence, device: str | torch.device = "cpu", mean: np.ndarray | None = None,
        std: np.ndarray | None = None, length: int = 0, clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of (n_i, D) arrays (any float dtype) into x (B, N, D) float32 and mask (B, N) bool, N the
    largest n_i (at least `length`).

    With `mean` and `std`, each bag is standardised, (v - mean) / std in float32 (the same numbers as numpy's), as
    it is copied in: the batch exists once, not also as a standardised copy of every bag first. `clip` > 0 then
    limits each value to +-clip (standard deviations, when standardised).
    """
    n = max(max((len(b) for b in bags), default=0), length)
    d = int(bags[0].shape[1])
    x = torch.empty(len(bags), n, d, dtype=torch.float32)
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    xn = x.numpy()  # the tensor's memory: bags (read-only ones too) are copied straight in
    m = np.asarray(mean, dtype=np.float32) if mean is not None else None
    s = np.asarray(std, dtype=np.float32) if std is not None else None
    for i, b in enumerate(bags):
        k = len(b)
        xi = xn[i, :k]
        xi[...] = b
        if m is not None:
            xi -= m
        if s is not None:
            xi /= s
        if clip > 0:
            np.clip(xi, -clip, clip, out=xi)
        xn[i, k:] = 0
        mask[i, :k] = True
    return x.to(device), mask.to(device)
