"""k-NN protocol: vote logic against hand computations, FAISS against brute force, metrics against sklearn,
the protocol on synthetic clusters, errors, k specs and the plot."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.knn import (
    binary_f1,
    class_f1,
    classify,
    confusions_per_k,
    knn_predict,
    parse_ks,
    vote_all_k,
    weighted_f1,
)
from cytoretrieve.store.ann import exact_neighbours, l2_normalise

# ------------------------------------------------------------------------------------------------ vote logic

# Six training points on the unit circle (angle in degrees, class) and two queries: cosine = cos(angle difference).
TRAIN_DEG = [(0, 0), (10, 1), (20, 1), (90, 0), (180, 1), (100, 0)]
QUERY_DEG = [4, 150]


def _circle(degrees: list[float]) -> np.ndarray:
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def _reference_vote(query_deg: float, k: int, vote: str, temperature: float) -> int:
    """Straight-line k-NN vote in pure Python, the obviously-correct version."""
    sims = sorted(((math.cos(math.radians(query_deg - d)), c) for d, c in TRAIN_DEG), reverse=True)[:k]
    if vote == "weighted":
        score = Counter()
        for s, c in sims:
            score[c] += math.exp(s / temperature)
        return max(sorted(score), key=lambda c: score[c])
    count, sim_sum = Counter(c for _, c in sims), Counter()
    for s, c in sims:
        sim_sum[c] += s
    return max(sorted(count), key=lambda c: (count[c], sim_sum[c]))


def _predict(k: int, vote: str, temperature: float = 0.07) -> list[int]:
    train = _circle([d for d, _ in TRAIN_DEG])
    codes = np.array([c for _, c in TRAIN_DEG])
    return knn_predict(train, codes, _circle(QUERY_DEG), k, vote, temperature, 2).tolist()


@pytest.mark.parametrize(
    ("k", "vote", "temperature", "expected"),
    [
        (1, "majority", 0.07, [0, 1]),  # nearest: 0deg (class 0); 180deg (class 1)
        (2, "majority", 0.07, [0, 1]),  # 1-1 count ties, broken by the larger similarity
        (3, "majority", 0.07, [1, 0]),  # {0:1, 1:2} and {1:1, 0:2}
        (1, "weighted", 0.07, [0, 1]),
        (3, "weighted", 0.07, [1, 1]),  # q0: e^(.9976/T) < e^(.9945/T) + e^(.9613/T); q1: e^(.866/T) dominates
        (3, "weighted", 0.01, [0, 1]),  # a colder vote lets the single closest neighbour win for q0
    ],
)
def test_vote_matches_hand_computation(k: int, vote: str, temperature: float, expected: list[int]) -> None:
    assert _predict(k, vote, temperature) == expected
    assert [_reference_vote(q, k, vote, temperature) for q in QUERY_DEG] == expected


def test_vote_all_k_columns_equal_single_k_predictions() -> None:
    for vote in ("majority", "weighted"):
        for temperature in (0.07, 0.01):
            train = _circle([d for d, _ in TRAIN_DEG])
            codes = np.array([c for _, c in TRAIN_DEG])
            sims, idx = exact_neighbours(train, _circle(QUERY_DEG), 6)
            all_k = vote_all_k(codes[idx], sims, 2, vote, temperature)
            for k in range(1, 7):
                expected = [_reference_vote(q, k, vote, temperature) for q in QUERY_DEG]
                assert all_k[:, k - 1].tolist() == expected, (vote, temperature, k)


def test_exact_ties_fall_back_to_class_order() -> None:
    codes, sims = np.array([[2, 1]]), np.array([[0.5, 0.5]])
    assert vote_all_k(codes, sims, 3, "majority", 0.07).tolist() == [[2, 1]]
    assert vote_all_k(codes, sims, 3, "weighted", 0.07).tolist() == [[2, 1]]


def test_weighted_vote_survives_tiny_temperature() -> None:
    codes, sims = np.array([[0, 1, 1]]), np.array([[0.99, 0.98, 0.98]])
    assert vote_all_k(codes, sims, 2, "weighted", 1e-5).tolist() == [[0, 0, 0]]


# ------------------------------------------------------------------------------------- FAISS vs brute force


def test_l2_normalise_rows_and_zero_rows() -> None:
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_faiss_neighbours_equal_brute_force() -> None:
    rng = np.random.default_rng(1)
    train, query = l2_normalise(rng.standard_normal((80, 16))), l2_normalise(rng.standard_normal((25, 16)))
    sims, idx = exact_neighbours(train, query, 10)
    brute = query @ train.T
    order = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(sims, np.take_along_axis(brute, order, axis=1), atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 7, 15])
def test_majority_predictions_match_sklearn_cosine(k: int) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(2)
    train, query = rng.standard_normal((80, 16)), rng.standard_normal((40, 16))
    labels = rng.integers(0, 2, 80)  # two classes and odd k: no count ties
    expected = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train, labels).predict(query)
    np.testing.assert_array_equal(knn_predict(train, labels, query, k, "majority", 0.07, 2), expected)


# ----------------------------------------------------------------------------------------- metrics vs sklearn


def test_f1_from_confusion_matches_sklearn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, 60)  # class 4 is never true but is predicted; class 5 never appears
    preds = rng.integers(0, 5, (60, 3))
    conf = confusions_per_k(truth, preds, 6)
    for j in range(3):
        np.testing.assert_allclose(weighted_f1(conf[j]), f1_score(truth, preds[:, j], average="weighted"))
        expected = f1_score(truth, preds[:, j], labels=range(6), average=None, zero_division=0.0)
        np.testing.assert_allclose(class_f1(conf[j]), expected)


def test_binary_f1_excludes_unmapped_truth_and_counts_unmapped_predictions_wrong() -> None:
    from sklearn.metrics import f1_score

    # classes N (negative), P (positive), U (binary None); rows = truth, cols = prediction
    conf = np.array([[5, 1, 2], [0, 4, 1], [3, 3, 3]])
    pos, neg = binary_f1(conf, [0, 1, None])
    assert pos == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))  # TP 4, FN 1 (predicted U), FP 1 (N -> P)
    assert neg == pytest.approx(2 * 5 / (2 * 5 + 0 + 3))  # TP 5, FN 3 (1 -> P, 2 -> U), FP 0
    to_binary = {0: 0, 1: 1, 2: -1}
    truth = [t for t in range(2) for p in range(3) for _ in range(conf[t, p])]
    preds = [to_binary[p] for t in range(2) for p in range(3) for _ in range(conf[t, p])]
    assert pos == pytest.approx(f1_score(truth, preds, labels=[1], average=None)[0])
    assert neg == pytest.approx(f1_score(truth, preds, labels=[0], average=None)[0])


# --------------------------------------------------------------------------------------------- the protocol

CLASSES7 = [f"c{i}" for i in range(7)]


def _clusters(n_classes: int, per_class: int, dims: int, spread: float, seed: int = 0,
              centres: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs; `centres[i]` names which centre class i uses (shared centres make classes inseparable)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_classes, dims)) * 10
    centres = centres or list(range(n_classes))
    x = np.concatenate([means[centres[i]] + spread * rng.standard_normal((per_class, dims)) for i in range(n_classes)])
    return x.astype(np.float32), np.repeat(np.arange(n_classes), per_class)


def test_separated_clusters_score_perfectly() -> None:
    x, y = _clusters(7, 40, 32, spread=1.0)
    res = classify(x, [CLASSES7[i] for i in y], ks=range(1, 11), runs=2)
    assert res.f1_curve_mean[:5] == [1.0] * 5
    assert res.k_best == 1 and res.weighted_f1_mean == 1.0 and res.weighted_f1_std == 0.0
    assert all(v == 1.0 for v in res.class_f1_mean.values())
    conf = np.array(res.confusion)
    assert conf.sum() == 2 * res.n_test and (conf == np.diag(np.diag(conf))).all()
    assert (res.n_train, res.n_test) == (210, 70)


@pytest.mark.parametrize("vote", ["majority", "weighted"])
def test_random_labels_score_near_chance(vote: str) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((350, 32))
    labels = [CLASSES7[i] for i in np.repeat(np.arange(7), 50)]
    res = classify(x, labels, ks=range(1, 31), vote=vote)
    assert max(res.f1_curve_mean) < 0.3  # chance is ~1/7
    assert 0.03 < float(np.mean(res.f1_curve_mean)) < 0.25


def test_binary_collapse_on_clusters() -> None:
    classes = ["NEG1", "NEG2", "POS1", "POS2", "UNK"]
    binary = {"NEG1": 0, "NEG2": 0, "POS1": 1, "POS2": 1, "UNK": None}
    x, y = _clusters(5, 40, 32, spread=1.0, centres=[0, 1, 2, 2, 3])  # POS1 and POS2 share a centre
    res = classify(x, [classes[i] for i in y], classes=classes, binary=binary, ks=[1, 3, 5])
    assert res.pos_f1_mean == 1.0 and res.neg_f1_mean == 1.0 and res.pos_f1_std == 0.0
    assert res.class_f1_mean["POS1"] < 0.9 and res.class_f1_mean["POS2"] < 0.9
    assert res.class_f1_mean["NEG1"] == 1.0 and res.class_f1_mean["UNK"] == 1.0
    assert res.weighted_f1_mean < 1.0
    no_binary = classify(x, [classes[i] for i in y], classes=classes, ks=[1, 3, 5])
    assert no_binary.pos_f1_mean is None and no_binary.neg_f1_std is None


def test_unlabelled_rows_excluded_and_classes_keep_given_order() -> None:
    x, y = _clusters(3, 20, 8, spread=1.0)
    labels: list[str | None] = ["abc"[i] for i in y]
    labels[0], labels[25] = None, ""
    res = classify(x, labels, classes=["c", "a", "b"], ks=[1, 2], runs=1)
    assert res.classes == ["c", "a", "b"] and res.n_unlabelled == 2
    assert res.n_train + res.n_test == 58
    assert classify(x, labels, ks=[1], runs=1).classes == ["a", "b", "c"]


def test_k_best_mean_std_and_seeds() -> None:
    x, y = _clusters(4, 30, 16, spread=6.0, seed=5)
    labels = ["abcd"[i] for i in y]
    res = classify(x, labels, ks=range(1, 21), runs=2, seed=10)
    assert res.k_best == res.ks[int(np.argmax(res.f1_curve_mean))]
    assert res.weighted_f1_mean == max(res.f1_curve_mean)
    # run r uses seed + r, so the two single runs are the two runs; std is the population std (ddof=0)
    a, b = (classify(x, labels, ks=range(1, 21), runs=1, seed=s) for s in (10, 11))
    np.testing.assert_allclose(res.f1_curve_mean, (np.array(a.f1_curve_mean) + b.f1_curve_mean) / 2)
    np.testing.assert_allclose(res.f1_curve_std, np.abs(np.array(a.f1_curve_mean) - b.f1_curve_mean) / 2)
    assert a.f1_curve_std == [0.0] * 20
    # the per-split F1 at k* are the two single runs' F1 at that k (what a paired comparison needs)
    k = res.ks.index(res.k_best)
    np.testing.assert_allclose(res.weighted_f1_runs, [a.f1_curve_mean[k], b.f1_curve_mean[k]])
    assert np.mean(res.weighted_f1_runs) == pytest.approx(res.weighted_f1_mean)
    assert np.array(res.confusion).sum() == 2 * res.n_test
    assert classify(x, labels, ks=range(1, 21), runs=2, seed=10).to_dict() == res.to_dict()
    assert classify(x, labels, ks=range(1, 21), runs=2, seed=11).f1_curve_mean != res.f1_curve_mean


def test_to_dict_is_json_and_equals_attributes() -> None:
    x, y = _clusters(3, 20, 8, spread=4.0)
    res = classify(x, ["abc"[i] for i in y], binary={"a": 0, "b": 1, "c": 1}, ks=range(1, 6), vote="weighted")
    data = json.loads(json.dumps(res.to_dict()))
    for key, value in data.items():
        assert value == getattr(res, key), key
    assert data["vote"] == "weighted" and data["temperature"] == 0.07


# ------------------------------------------------------------------------------------------------------ errors


def _small() -> tuple[np.ndarray, list[str]]:
    x, y = _clusters(3, 8, 8, spread=1.0)
    return x, ["abc"[i] for i in y]


def _nan_row(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[3, 0] = np.nan
    return x


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one class", "at least 2 classes"),
        ("singleton class", "'c' has 1 labelled"),
        ("length mismatch", "24 vectors but 23 labels"),
        ("nan", "NaN"),
    ],
)
def test_data_errors(case: str, message: str) -> None:
    x, labels = _small()  # 8 rows each of a, b, c (c last)
    x, labels = {
        "one class": (x, ["a"] * len(labels)),
        "singleton class": (x[:-7], labels[:-7]),
        "length mismatch": (x, labels[:-1]),
        "nan": (_nan_row(x), labels),
    }[case]
    with pytest.raises(CytoError, match=message):
        classify(x, labels, ks=[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ks": [19]}, "largest allowed k is 18"),
        ({"train_fraction": 0.0}, "train fraction"),
        ({"train_fraction": 1.0}, "train fraction"),
        ({"runs": 0}, "runs must be"),
        ({"vote": "softmax"}, "unknown vote"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"ks": [0, 1]}, "positive"),
        ({"classes": ["a", "b"]}, "not among the classes"),
        ({"binary": {"a": 0, "b": 1}}, "no entry"),
    ],
)
def test_option_errors(kwargs: dict, message: str) -> None:
    x, labels = _small()
    options = {"ks": [1], **kwargs}
    with pytest.raises(CytoError, match=message):
        classify(x, labels, **options)


def test_knn_predict_rejects_k_beyond_training_set() -> None:
    with pytest.raises(CytoError, match="1..6"):
        knn_predict(_circle([0, 1, 2, 3, 4, 5]), np.zeros(6, dtype=int), _circle([0]), 7, "majority", 0.07, 1)


# ---------------------------------------------------------------------------------------------------- k specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1-100", list(range(1, 101))),
        ("5", [5]),
        ("1,3,5,10", [1, 3, 5, 10]),
        ("1-20,50", list(range(1, 21)) + [50]),
        (" 10, 3-4 ,3 ", [3, 4, 10]),
    ],
)
def test_parse_ks(spec: str, expected: list[int]) -> None:
    assert parse_ks(spec) == expected


@pytest.mark.parametrize("spec", ["", "0", "a", "5-1", "1-", "-3", "1,,2", "1.5", "0-4"])
def test_parse_ks_errors(spec: str) -> None:
    with pytest.raises(CytoError, match="bad k spec"):
        parse_ks(spec)


# ------------------------------------------------------------------------------------------------------- plot


def test_plot_classify_writes_png(tmp_path) -> None:
    from PIL import Image

    from cytoretrieve.views.plots import plot_classify

    x, y = _clusters(4, 20, 8, spread=5.0)
    res = classify(x, ["abcd"[i] for i in y], ks=range(1, 16), runs=2)
    path = tmp_path / "sub" / "knn.png"
    plot_classify(res, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 800 <= width <= 3000 and 400 <= height <= 2000 and width > height
