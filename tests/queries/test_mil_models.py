"""MIL models on tiny synthetic bags whose positive instances are known: they learn, and attention finds them."""

from __future__ import annotations

import numpy as np
import pytest

from cytoretrieve.queries.mil.metrics import auc
from cytoretrieve.queries.mil.train import MILTrainConfig, fit
from helpers.mil_synthetic import synthetic_bags


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and spinning OpenMP threads on a shared 2-core machine cost 10x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    train, _ = synthetic_bags(60, seed=0)
    test, masks = synthetic_bags(40, seed=1)
    return train, test, masks


def test_abmil_reaches_high_auc_and_attends_to_the_positive_instances(data) -> None:
    train, test, masks = data
    scorer = fit(train, MILTrainConfig(method="abmil", epochs=30, device="cpu"))
    p, att = scorer.predict(test.vectors)
    assert auc(test.y, p) >= 0.95
    assert all(abs(a.sum() - 1) < 1e-4 for a in att)  # attention weights of a bag sum to 1 over its instances
    # attention mass on the (1-2 of 8-19) positive instances of positive bags: chance would be ~10%
    mass = [a[m].sum() for a, m, y in zip(att, masks, test.y) if y == 1]
    assert np.mean(mass) > 0.6
    # the top-attended instance of most positive bags is a positive one
    assert np.mean([m[np.argmax(a)] for a, m, y in zip(att, masks, test.y) if y == 1]) > 0.8


@pytest.mark.parametrize("method", ["gated", "mean", "max", "topk"])
def test_other_poolings_learn_the_synthetic_bags(data, method: str) -> None:
    train, test, masks = data
    scorer = fit(train, MILTrainConfig(method=method, epochs=30, lr=2e-3, top_k=2, device="cpu"))
    p, inst = scorer.predict(test.vectors)
    assert auc(test.y, p) >= (0.8 if method == "mean" else 0.9)  # mean pooling dilutes 1-2 positives of 8-19
    assert [len(s) for s in inst] == [len(v) for v in test.vectors]


def test_instance_negatives_push_negative_tiles_below_positive_ones(data) -> None:
    train, test, masks = data
    scorer = fit(train, MILTrainConfig(method="topk", top_k=2, epochs=30, lr=2e-3, instance_negatives=1.0, device="cpu"))
    _, inst = scorer.predict(test.vectors)
    pos = np.concatenate([s[m] for s, m in zip(inst, masks)])
    neg = np.concatenate([s[~m] for s, m in zip(inst, masks)])
    assert auc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]) > 0.95


def test_unknown_method_is_refused() -> None:
    from cytoretrieve.queries.mil.models import MILModel

    with pytest.raises(ValueError, match="unknown MIL method"):
        MILModel(4, "median")


def test_augmented_bag_is_the_negative_bag_plus_a_few_annotated_positives() -> None:
    from cytoretrieve.queries.mil.train import augmented_bag

    rng = np.random.default_rng(0)
    neg = np.zeros((10, 3), np.float32)
    pos = np.ones((5, 3), np.float32)
    sizes = set()
    for _ in range(50):
        bag = augmented_bag(neg, pos, 4, rng)
        inserted = int(bag[:, 0].sum())
        assert len(bag) == 10 + inserted and 1 <= inserted <= 4 and (bag[bag[:, 0] == 0] == 0).all()
        sizes.add(inserted)
    assert sizes == {1, 2, 3, 4}


def test_positive_bag_augmentation_learns_from_negative_slides_and_annotated_cells(data) -> None:
    """Trained on negative bags only, the positives all coming from annotated cells inserted into them, the model
    still ranks the real positive test bags first: the augmentation is what supplies the positive class."""
    train, test, masks = data
    negatives = train.subset(np.flatnonzero(train.y == 0))
    annotated, cell_masks = synthetic_bags(20, seed=2)
    cells = np.concatenate([v[m] for v, m in zip(annotated.vectors, cell_masks)])  # annotated positive cells
    with pytest.raises(Exception, match="annotated positive"):
        fit(negatives, MILTrainConfig(augment_positives=0.5, device="cpu"))
    scorer = fit(negatives, MILTrainConfig(method="abmil", epochs=30, augment_positives=0.5, device="cpu"), cells)
    p, att = scorer.predict(test.vectors)
    assert auc(test.y, p) >= 0.9
    assert np.mean([m[np.argmax(a)] for a, m, y in zip(att, masks, test.y) if y == 1]) > 0.7


def test_augmentation_still_needs_negative_training_slides() -> None:
    """Augmented bags can stand in for missing positive training slides, never for missing negative ones."""
    from cytoretrieve.errors import CytoError
    from cytoretrieve.queries.mil.bags import Positives
    from cytoretrieve.queries.mil.evaluate import cross_validate
    from cytoretrieve.sources.cohort.split import Split

    bags, masks = synthetic_bags(16, seed=4)
    cells = np.concatenate([v[m] for v, m in zip(bags.vectors, masks)])
    positives = Positives(cells, [None] * len(cells))
    cfg = MILTrainConfig(epochs=2, augment_positives=0.5, device="cpu")

    def split(fold_of_class: dict[int, list[int]]) -> Split:  # folds by class: bag i goes to a fold of its class
        fold_of = {n: fold_of_class[int(y)][i % len(fold_of_class[int(y)])] for i, (n, y) in enumerate(zip(bags.names, bags.y))}
        return Split(4, 0, fold_of, {n: str(y) for n, y in zip(bags.names, bags.y)}, dict(zip(bags.names, bags.y.tolist())))

    only_negatives = cross_validate(bags, split({0: [0, 1, 2, 3], 1: [0, 1]}), "abmil", train_config=cfg,
                                    positives=positives, folds=[0])  # fold 0 trains on folds 2-3: negatives only
    assert len(only_negatives.folds) == 1
    with pytest.raises(CytoError, match="only one class"):  # fold 0 trains on folds 2-3: positives only
        cross_validate(bags, split({0: [0, 1], 1: [0, 1, 2, 3]}), "abmil", train_config=cfg, positives=positives,
                       folds=[0])


def test_models_trained_in_lockstep_match_separate_fits(data) -> None:
    """fit_many trains each set's model as fit would (own seed, rng, standardisation): with sets of equal size and
    no dropout (whose masks come from torch's one generator in another order) the predictions agree with separate
    fits to float rounding, so the vmapped models do not leak into each other."""
    from dataclasses import replace

    from cytoretrieve.queries.mil.train import fit_many

    train, test, _ = data
    sets = [train.subset(range(30)), train.subset(range(30, 60))]
    cfg = MILTrainConfig(method="gated", epochs=3, dropout=0.0, device="cpu")
    configs = [replace(cfg, seed=1), replace(cfg, seed=2)]
    together = fit_many(sets, configs)
    for bags, c, scorer in zip(sets, configs, together):
        alone = fit(bags, c)
        np.testing.assert_allclose(scorer.predict(test.vectors)[0], alone.predict(test.vectors)[0], atol=1e-4)
    first, second = (s.predict(test.vectors)[0] for s in together)
    assert np.abs(first - second).max() > 1e-3  # different data and seeds: different models
    with pytest.raises(ValueError, match="only in `seed`"):
        fit_many(sets, [cfg, replace(cfg, lr=1e-3)])


def _bce(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def test_early_stopping_returns_the_weights_of_the_best_validation_epoch(data) -> None:
    """With `validation`, the held-out bags are stratified, never trained on, and the returned model is the one of
    the epoch with the lowest validation loss: here an earlier one than the last (a high learning rate makes the
    loss wander), so returning the last weights would fail."""
    from dataclasses import replace

    from cytoretrieve.errors import CytoError
    from cytoretrieve.queries.mil.train import fit_many

    train, _, _ = data
    cfg = MILTrainConfig(epochs=25, lr=1e-2, validation=0.25, device="cpu")
    scorer = fit(train, cfg)
    val = train.subset(scorer.validation)
    assert len(scorer.history) == 25 and scorer.best_epoch < 24
    assert scorer.history[scorer.best_epoch] == min(scorer.history) < scorer.history[-1]
    assert sorted(np.bincount(val.y.astype(int)).tolist()) == sorted(
        np.round(0.25 * np.bincount(train.y.astype(int))).astype(int).tolist())
    assert _bce(scorer.predict(val.vectors)[0], val.y) == pytest.approx(min(scorer.history), abs=1e-5)
    sets = [train.subset(range(30)), train.subset(range(30, 60))]  # in lockstep: each model its own best
    for bags, s in zip(sets, fit_many(sets, [replace(cfg, epochs=6, seed=k) for k in (1, 2)])):
        v = bags.subset(s.validation)
        assert _bce(s.predict(v.vectors)[0], v.y) == pytest.approx(min(s.history), abs=1e-5)
    with pytest.raises(CytoError, match="fraction"):
        fit(train, replace(cfg, validation=1.0))


def test_weight_averaging_returns_the_mean_of_the_last_epochs_weights(data) -> None:
    """`average` = 0.5 of 4 epochs returns the mean of the weights at the ends of epochs 3 and 4: those are the
    weights of runs stopped there (a constant lr and the same seed make the first epochs of a longer run the same),
    so the mean is checked against them; in lockstep each model gets the mean of its own weights."""
    from dataclasses import replace

    from cytoretrieve.errors import CytoError
    from cytoretrieve.queries.mil.train import fit_many

    train = data[0].subset(range(40))
    cfg = MILTrainConfig(epochs=4, lr=1e-2, device="cpu")

    def weights(scorer) -> dict:  # noqa: ANN001
        return {k: v.detach().clone() for k, v in scorer.model.state_dict().items()}

    ends = [weights(fit(train, replace(cfg, epochs=e))) for e in (3, 4)]
    averaged = weights(fit(train, replace(cfg, average=0.5)))
    for k, v in averaged.items():
        np.testing.assert_allclose(v.numpy(), ((ends[0][k] + ends[1][k]) / 2).numpy(), atol=1e-6)
    assert any(not np.allclose(v.numpy(), ends[1][k].numpy()) for k, v in averaged.items())  # not the last weights
    one_epoch = weights(fit(train, replace(cfg, average=0.25)))  # the mean of the last epoch alone: the last weights
    for k, v in one_epoch.items():
        np.testing.assert_allclose(v.numpy(), ends[1][k].numpy(), atol=1e-7)
    sets = [train.subset(range(20)), train.subset(range(20, 40))]
    lockstep = fit_many(sets, [replace(cfg, seed=k, average=1.0, dropout=0.0) for k in (1, 2)])
    for i, bags in enumerate(sets):  # each model of the lockstep = its own averaged fit
        single = fit(bags, replace(cfg, seed=i + 1, average=1.0, dropout=0.0))
        np.testing.assert_allclose(single.predict(bags.vectors)[0], lockstep[i].predict(bags.vectors)[0], atol=1e-4)
    assert not np.allclose(lockstep[0].predict(sets[0].vectors)[0], lockstep[1].predict(sets[0].vectors)[0])
    with pytest.raises(CytoError, match="use one"):
        fit(train, replace(cfg, average=0.5, validation=0.2))


def test_clip_limits_standardised_features_in_training_and_at_inference(data) -> None:
    """`clip` = c: `pad` writes clip((v - mean) / std, -c, c), and the fitted scorer clips the same way, so a value
    pushed far beyond the bound scores exactly as the bound itself (a heavy-tailed feature's outlier cannot drive
    a bag's score)."""
    from dataclasses import replace

    from cytoretrieve.queries.mil.models import pad

    train, test, _ = data
    bags = [np.asarray(b, dtype=np.float32) for b in test.vectors[:3]]
    mean, std = np.zeros(train.dim, np.float32) + 0.1, np.full(train.dim, 0.5, np.float32)
    x, mask = pad(bags, "cpu", mean, std, clip=1.5)
    for i, b in enumerate(bags):
        np.testing.assert_allclose(x[i, : len(b)].numpy(), np.clip((b - mean) / std, -1.5, 1.5), rtol=1e-6)
    assert float(x.abs().max()) <= 1.5
    for i, b in enumerate(bags):  # padding stays 0 (and masked)
        assert not mask[i, len(b):].any() and not x[i, len(b):].any()

    cfg = MILTrainConfig(epochs=3, clip=3.0, device="cpu")
    scorer = fit(train, cfg)
    assert scorer.clip == 3.0
    bag = np.asarray(test.vectors[0], dtype=np.float32).copy()
    at_bound, beyond = bag.copy(), bag.copy()
    at_bound[0, 0] = scorer.mean[0] + 3.0 * scorer.std[0]
    beyond[0, 0] = scorer.mean[0] + 300.0 * scorer.std[0]
    p = [scorer.predict([b])[0][0] for b in (at_bound, beyond)]
    assert p[0] == pytest.approx(p[1], abs=1e-7)
    unclipped = fit(train, replace(cfg, clip=0.0))
    assert unclipped.predict([beyond])[0][0] != pytest.approx(unclipped.predict([at_bound])[0][0], abs=1e-7)
    assert fit(train, replace(cfg, standardise=False)).clip == 0.0  # raw features: no std to clip in


def test_train_config_round_trips_through_its_dict_and_a_schedule_must_be_known(data) -> None:
    from cytoretrieve.errors import CytoError

    cfg = MILTrainConfig(encoder=(256, 128, 64), method="gated", validation=0.2, epochs=100, weight_decay=5e-3,
                         schedule="cosine")
    assert MILTrainConfig(**cfg.to_dict()) == cfg
    with pytest.raises(CytoError, match="unknown learning-rate schedule 'step'"):
        fit(data[0], MILTrainConfig(schedule="step", device="cpu"))


def test_cosine_schedule_ends_the_training_at_a_learning_rate_near_zero() -> None:
    import torch

    from cytoretrieve.queries.mil.train import SCHEDULES

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = SCHEDULES["cosine"](opt, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[5] == pytest.approx(2.5e-4) and lrs[-1] < 2e-5
    assert SCHEDULES["constant"](opt, 10) is None
