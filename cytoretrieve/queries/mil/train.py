"""Training a MIL model on bags: one bag per step (as Ilse et al. 2018 train on the MIL benchmarks; `batch_size` > 1
pads and masks several into a batch), Adam, BCE on bag logits (positives weighted by n_negative / n_positive), CPU
or GPU. `fit_many` trains several models (cross-validation folds) in lockstep, one vmapped step for all.

Why one bag per step: with padded batches of 16, 40 epochs were ~500 updates on a benchmark's ~180 training bags,
and the model stayed 1.4-3.4 points under the published accuracies on every MIL benchmark; one bag per step (the
same epochs, ~7,000 updates) closes most of that gap (BENCHMARKS.md, "MIL benchmarks").

Cytology-aware options:
- `instance_negatives` > 0 adds, for every negative bag of a batch, the BCE of each of its instance logits against
  0 (every tile of a negative slide is a negative instance), weighted by that factor.
- `augment_positives` = p > 0 (needs annotated positive vectors): each epoch, each negative training bag is, with
  probability p, also added as a positive bag holding 1..`augment_max` annotated positive cells or tiles at random
  places among its own instances. A Pap smear is positive when a few cells are, so a negative slide plus a few
  abnormal cells is a realistic positive; it gives the model positives whose evidence is known, where the real
  positive slides hide a handful of abnormal tiles among thousands.

Early stopping (`validation` = f > 0): a stratified fraction f of the training bags is held out (drawn with the
run's seed, at least one bag of each class), the model trains on the rest for `epochs`, and the weights of the epoch
with the lowest validation BCE (unweighted, dropout off) are the ones returned; `MILScorer.history` holds the
per-epoch validation losses and `best_epoch` the chosen one. Off by default (BENCHMARKS.md, "Issue 14").

Weight averaging (`average` = f > 0): the returned weights are the mean of the weights at the ends of the last
f x `epochs` epochs (stochastic weight averaging, Izmailov et al. 2018), one model as before, so inference costs
the same. One bag per step leaves the last weights wherever the last few bags pushed them. Off by default.

`schedule`: the learning rate over the epochs, a name of SCHEDULES ("constant", the default; "cosine": from `lr`
down to 0 along a half cosine, stepped once per epoch).

Features are standardised with the mean / std of the training instances (`standardise=True`, the default) and then
limited to +-`clip` standard deviations (5 by default; 0 = off); the fitted `MILScorer` applies the same transform
at inference (raw features, `standardise=False`, are never clipped). Why the clip: features with heavy tails (the
Corel MIL sets: 0.08-0.09% of values beyond 10 std, up to 37) let one outlying value drive a ReLU unit and the
attention. With it ABMIL meets the published level on all five MIL benchmarks; the gain is clear on tiger, within
noise on the others (BENCHMARKS.md, "Issue 14, part 1, met"). At 5 std it touches ~0.1% of the values of CNN cell
embeddings (1.3% at 3 std).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.mil.bags import Bags
from cytoretrieve.runtime import resolve_device


def _constant(opt, epochs: int):  # noqa: ANN001, ANN202 - no scheduler: lr stays `lr`
    return None


def _cosine(opt, epochs: int):  # noqa: ANN001, ANN202 - lr from `lr` down to 0 along a half cosine, per epoch
    import torch

    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))


SCHEDULES = {"constant": _constant, "cosine": _cosine}


@dataclass
class MILTrainConfig:
    method: str = "abmil"
    encoder: tuple[int, ...] = (128,)  # instance network: one Linear + ReLU (+ dropout) per width
    attention: int = 64
    dropout: float = 0.25
    top_k: int = 4
    epochs: int = 40
    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 1  # bags per step, as Ilse et al. 2018 train; more are padded + masked into one batch
    instance_negatives: float = 0.0  # weight of the instance-level loss on negative bags' instances (0 = off)
    augment_positives: float = 0.0  # probability a negative bag is also trained on as an augmented positive
    augment_max: int = 4  # annotated positives inserted into an augmented bag: 1 to this many
    max_instances: int = 8192  # training bags larger than this are subsampled (each epoch anew)
    standardise: bool = True
    clip: float = 5.0  # standardised features limited to +-clip std (heavy-tailed features' outliers); 0 = off;
    #                    only with `standardise` (raw features have no std to count in)
    schedule: str = "constant"  # learning rate over the epochs: a name of SCHEDULES
    validation: float = 0.0  # fraction of training bags held out (stratified) to pick the best epoch; 0 = off
    average: float = 0.0  # fraction of the last epochs whose end-of-epoch weights are averaged (SWA); 0 = off
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


class MILScorer:
    """A trained model with its feature standardisation: `predict(bags)` -> (bag probabilities, instance scores)."""

    def __init__(self, model, mean: np.ndarray, std: np.ndarray, device: str, clip: float) -> None:  # noqa: ANN001
        self.model, self.mean, self.std, self.device, self.clip = model, mean, std, device, clip
        self.history: list[float] = []  # validation loss per epoch (early stopping only)
        self.best_epoch: int | None = None  # the epoch whose weights these are (early stopping only)
        self.validation: np.ndarray | None = None  # indices of the training bags held out for it

    def predict(self, vectors: list[np.ndarray], batch_size: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
        import torch

        from cytoretrieve.queries.mil.models import pad

        self.model.eval()
        probs: list[float] = []
        inst: list[np.ndarray] = []
        with torch.inference_mode():
            for a in range(0, len(vectors), batch_size):
                chunk = vectors[a:a + batch_size]
                x, mask = pad(chunk, self.device, self.mean, self.std, clip=self.clip)
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
    return fit_many([bags], [config or MILTrainConfig()], [positives])[0]


def fit_many(sets: Sequence[Bags], configs: Sequence[MILTrainConfig],
             positives: Sequence[np.ndarray | None] | None = None) -> list[MILScorer]:
    """Train one model per bag set in lockstep (cross-validation folds): step t updates every model on its own
    t-th batch at once (torch.func.vmap over the stacked models), so K folds cost about one fold's Python and
    kernel-launch overhead, the cost that dominates one small bag per step. Each model has its own seed, rng,
    standardisation and positive weight, and Adam (element-wise) keeps the updates independent. The one
    difference from K separate `fit` calls: an epoch has as many steps as the largest set has bags, and a set
    with fewer bags draws its missing ones at random from its own (at most a bag or two per epoch in CV folds), and
    dropout masks come from torch's generator in another order (same distribution). The configs may differ only
    in `seed`."""
    from dataclasses import replace

    cfg = configs[0]
    if any(replace(c, seed=cfg.seed) != cfg for c in configs):
        raise ValueError("fit_many: the configs may differ only in `seed`")
    positives = list(positives) if positives is not None else [None] * len(sets)
    if cfg.augment_positives > 0 and any(p is None or not len(p) for p in positives):
        raise CytoError("positive-bag augmentation needs annotated positive vectors (`positives` TABLE)")
    if cfg.schedule not in SCHEDULES:
        raise CytoError(f"unknown learning-rate schedule '{cfg.schedule}' (one of {', '.join(SCHEDULES)})")
    if not 0 <= cfg.validation < 1:
        raise CytoError(f"`validation` is a fraction of the training bags in [0, 1), not {cfg.validation}")
    if cfg.clip < 0:
        raise CytoError(f"`clip` is a bound in standard deviations (0 = off), not {cfg.clip}")
    if not 0 <= cfg.average <= 1:
        raise CytoError(f"`average` is a fraction of the epochs in [0, 1], not {cfg.average}")
    if cfg.average > 0 and cfg.validation > 0:
        raise CytoError("`average` (weight averaging) and `validation` (early stopping) each pick the weights: use one")
    device = resolve_device(cfg.device)
    runs = [_Run.start(b, c, p if cfg.augment_positives > 0 else None) for b, c, p in zip(sets, configs, positives)]
    step = _Lockstep([r.model(c, device) for r, c in zip(runs, configs)], cfg, device)
    stopping = _EarlyStopping(len(runs)) if cfg.validation > 0 else None
    averaging = _WeightAverage(cfg.epochs - max(1, round(cfg.average * cfg.epochs))) if cfg.average > 0 else None
    for epoch in range(cfg.epochs):
        epochs = [r.epoch(cfg) for r in runs]
        steps = max(len(items) for items, _ in epochs)
        orders = [r.fill(items, steps) for r, (items, _) in zip(runs, epochs)]
        pos_weight = [w for _, w in epochs]
        for a in range(0, steps, cfg.batch_size):
            chunks = [[r.instances(item, cfg) for item in order[a:a + cfg.batch_size]] for r, order in zip(runs, orders)]
            targets = [[item[1] for item in order[a:a + cfg.batch_size]] for order in orders]
            step(runs, chunks, targets, pos_weight)
        step.end_epoch()
        if stopping is not None:
            stopping.update(epoch, step.validation_losses(runs), step)
        if averaging is not None:
            averaging.update(epoch, step.params)
    states = stopping.best if stopping is not None else averaging.states(len(runs)) if averaging and averaging.n else None
    scorers = [MILScorer(m, r.mean, r.std, device, step.clip) for m, r in zip(step.trained(states), runs)]
    if stopping is not None:
        for i, (s, r) in enumerate(zip(scorers, runs)):
            s.history, s.best_epoch, s.validation = stopping.history[i], stopping.best_epoch[i], r.held_out
    return scorers


def _validation_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) bag indices: `fraction` of each class held out (at least one bag of a class with two or
    more), drawn by `rng`; sorted."""
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        val.extend(idx[:k].tolist())
    val = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(y)), val), val


class _EarlyStopping:
    """Per model: the validation loss of every epoch, the best epoch so far and a copy of its weights."""

    def __init__(self, models: int) -> None:
        self.history: list[list[float]] = [[] for _ in range(models)]
        self.best_epoch: list[int | None] = [None] * models
        self.best: list[dict | None] = [None] * models

    def update(self, epoch: int, losses: list[float], step: _Lockstep) -> None:
        for i, loss in enumerate(losses):
            self.history[i].append(loss)
            if self.best_epoch[i] is None or loss < min(self.history[i][:-1]):  # ties keep the earlier epoch
                self.best_epoch[i], self.best[i] = epoch, step.state(i)


class _WeightAverage:
    """The running mean of the (stacked) parameters at the end of every epoch from `start` on: stochastic weight
    averaging (Izmailov et al. 2018) without its batch-norm pass (these models have none). One bag per step leaves
    the last weights wherever the last few bags pushed them; their mean over epochs is a flatter, steadier point
    at the same inference cost (one model)."""

    def __init__(self, start: int) -> None:
        self.start, self.n, self.mean = start, 0, None

    def update(self, epoch: int, params: dict) -> None:
        if epoch < self.start:
            return
        self.n += 1
        if self.mean is None:
            self.mean = {k: v.detach().clone() for k, v in params.items()}
        else:
            for k, v in params.items():
                self.mean[k] += (v.detach() - self.mean[k]) / self.n

    def states(self, models: int) -> list[dict]:
        """One state dict per model (the stacked means split again when several trained in lockstep)."""
        return [{k: (v[i] if models > 1 else v) for k, v in self.mean.items()} for i in range(models)]


@dataclass
class _Run:
    """One model's training data in a (lockstep) fit: its bags, standardisation, rng and annotated positives."""

    bags: Bags
    mean: np.ndarray
    std: np.ndarray
    rng: np.random.Generator
    seed: int
    positives: np.ndarray | None  # set only when augmenting
    val: Bags | None = None  # held out for early stopping
    held_out: np.ndarray | None = None  # their indices in the bags given to fit

    @classmethod
    def start(cls, bags: Bags, cfg: MILTrainConfig, positives: np.ndarray | None) -> _Run:
        rng = np.random.default_rng(cfg.seed)
        val = held_out = None
        if cfg.validation > 0:
            keep, held_out = _validation_split(np.asarray(bags.y), cfg.validation, rng)
            if not len(held_out):
                raise CytoError(f"{len(bags)} training bags are too few to hold out a validation split")
            bags, val = bags.subset(keep), bags.subset(held_out)
        mean, std = (_standardisation(bags) if cfg.standardise
                     else (np.zeros(bags.dim, np.float32), np.ones(bags.dim, np.float32)))
        pos = np.asarray(positives, dtype=np.float32) if positives is not None else None
        return cls(bags, mean, std, rng, cfg.seed, pos, val, held_out)

    def model(self, cfg: MILTrainConfig, device: str):  # noqa: ANN201 - a MILModel
        import torch

        from cytoretrieve.queries.mil.models import MILModel

        torch.manual_seed(self.seed)
        return MILModel(self.bags.dim, cfg.method, cfg.encoder, cfg.attention, cfg.dropout, cfg.top_k).to(device)

    def epoch(self, cfg: MILTrainConfig) -> tuple[list[tuple[int, float, bool]], float]:
        """This epoch's (bag index, label, augmented?) in training order, and its positive weight n_neg / n_pos.
        Augmented copies of negative bags (with probability `augment_positives`) are positives."""
        y = self.bags.y.astype(np.float32)
        negatives = np.flatnonzero(y == 0)
        extra = negatives[self.rng.random(len(negatives)) < cfg.augment_positives] if self.positives is not None \
            else negatives[:0]
        items = [(int(i), float(y[i]), False) for i in range(len(y))] + [(int(i), 1.0, True) for i in extra]
        n_pos = sum(t for _, t, _ in items)
        order = self.rng.permutation(len(items))
        return [items[j] for j in order], (len(items) - n_pos) / max(n_pos, 1.0)

    def fill(self, items: list, steps: int) -> list:
        """`items` made `steps` long with bags drawn at random from them (lockstep with a larger set)."""
        if len(items) >= steps:
            return items
        return items + [items[j] for j in self.rng.choice(len(items), steps - len(items))]

    def instances(self, item: tuple[int, float, bool], cfg: MILTrainConfig) -> np.ndarray:
        """The bag's instances for this step: subsampled above `max_instances`, annotated positives inserted into
        an augmented copy."""
        i, _, augmented = item
        v = self.bags.vectors[i]
        if len(v) > cfg.max_instances:
            v = v[np.sort(self.rng.choice(len(v), cfg.max_instances, replace=False))]
        if augmented:
            v = augmented_bag(v, self.positives, cfg.augment_max, self.rng)
        return v


class _Lockstep:
    """Adam steps of M models at once: the model itself when M = 1, else a vmap of its functional form over the
    stacked parameters (`torch.func.stack_module_state`); `trained()` writes the parameters back into the models."""

    def __init__(self, models: list, cfg: MILTrainConfig, device: str) -> None:
        import copy

        import torch
        from torch.func import functional_call, stack_module_state, vmap

        self.models, self.cfg, self.device = models, cfg, device
        self.clip = cfg.clip if cfg.standardise else 0.0  # in std: raw features are never clipped
        for m in models:
            m.train()
        if len(models) == 1:
            self.params = dict(models[0].named_parameters())
            self.forward = lambda x, mask: tuple(t.unsqueeze(0) for t in models[0](x[0], mask[0]))
        else:
            self.params, _ = stack_module_state(models)
            base = copy.deepcopy(models[0]).to("meta")
            call = vmap(lambda p, x, mask: functional_call(base, p, (x, mask)), randomness="different")
            self.forward = lambda x, mask: call(self.params, x, mask)
        # fused: one kernel for all parameters; with one small bag per step the per-tensor loop dominated
        self.opt = torch.optim.Adam(self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    fused=torch.device(device).type in ("cpu", "cuda"))
        self.schedule = SCHEDULES[cfg.schedule](self.opt, cfg.epochs)

    def end_epoch(self) -> None:
        if self.schedule is not None:
            self.schedule.step()

    def __call__(self, runs: list[_Run], chunks: list[list[np.ndarray]], targets: list[list[float]],
                 pos_weight: list[float]) -> None:
        import torch

        from cytoretrieve.queries.mil.models import pad

        bce = torch.nn.functional.binary_cross_entropy_with_logits
        n = max(len(v) for c in chunks for v in c)
        batches = [pad(c, self.device, r.mean, r.std, length=n, clip=self.clip) for r, c in zip(runs, chunks)]  # standardised
        if len(batches) == 1:  # a view, not a copy of a (possibly cohort-sized) batch
            x, mask = batches[0][0].unsqueeze(0), batches[0][1].unsqueeze(0)
        else:
            x, mask = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])  # (M, B, N, D)
        target = torch.as_tensor(np.asarray(targets, dtype=np.float32), device=self.device)  # (M, B)
        bag, _, inst = self.forward(x, mask)
        pw = torch.as_tensor(pos_weight, dtype=torch.float32, device=self.device).unsqueeze(1)
        loss = bce(bag, target, pos_weight=pw, reduction="none").mean(1)  # per model, as one fit's batch mean
        if self.cfg.instance_negatives > 0:  # every instance of a negative bag is a negative instance
            neg = ((target == 0).unsqueeze(2) & mask).to(inst.dtype)
            per = (bce(inst, torch.zeros_like(inst), reduction="none") * neg).sum((1, 2)) / neg.sum((1, 2)).clamp_min(1)
            loss = loss + self.cfg.instance_negatives * per
        self.opt.zero_grad()
        loss.sum().backward()  # the models share no parameter: each gets its own loss's gradient
        self.opt.step()

    def state(self, i: int) -> dict:
        """A copy of model i's current parameters."""
        return {k: (v[i] if len(self.models) > 1 else v).detach().clone() for k, v in self.params.items()}

    def validation_losses(self, runs: list[_Run]) -> list[float]:
        """Each model's mean BCE (unweighted, eval mode) on its run's held-out bags."""
        import torch
        from torch.func import functional_call

        from cytoretrieve.queries.mil.models import pad

        losses = []
        with torch.no_grad():
            for i, (m, r) in enumerate(zip(self.models, runs)):
                x, mask = pad(list(r.val.vectors), self.device, r.mean, r.std, clip=self.clip)
                y = torch.as_tensor(np.asarray(r.val.y, dtype=np.float32), device=self.device)
                m.eval()
                bag = functional_call(m, self.state(i), (x, mask))[0] if len(self.models) > 1 else m(x, mask)[0]
                m.train()
                losses.append(float(torch.nn.functional.binary_cross_entropy_with_logits(bag, y)))
        return losses

    def trained(self, states: list[dict] | None = None) -> list:
        """The trained models, in eval mode: with `states` (early stopping's best epochs, averaged weights), each
        with its own of those weights."""
        for i, m in enumerate(self.models):
            if states is not None:
                m.load_state_dict(states[i])
            elif len(self.models) > 1:
                m.load_state_dict({k: v[i].detach() for k, v in self.params.items()})
            m.eval()
        return self.models
