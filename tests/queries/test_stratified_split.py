"""`classify`'s stratified splits, drawn without scikit-learn (whose import cost over a second of every run), are
the very rows scikit-learn's `train_test_split(..., stratify=...)` gives, for uneven classes, ties in the class
proportions and several seeds; impossible splits are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.knn import stratified_split


@pytest.mark.parametrize("counts", [[2, 2], [5, 3, 2], [40, 7, 7, 7, 3], [150, 98, 182, 70, 146, 197, 74]])
@pytest.mark.parametrize("fraction", [0.5, 0.75, 0.9])
def test_the_same_rows_as_scikit_learn(counts: list[int], fraction: float) -> None:
    from sklearn.model_selection import train_test_split

    codes = np.random.default_rng(len(counts)).permutation(np.repeat(np.arange(len(counts)), counts))
    rows = np.arange(len(codes))
    for seed in range(6):
        try:
            want = train_test_split(rows, train_size=fraction, stratify=codes, random_state=seed)
        except ValueError:
            with pytest.raises(CytoError, match="cannot make a stratified split"):
                stratified_split(codes, fraction, seed)
            continue
        got = stratified_split(codes, fraction, seed)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_classify_never_imports_scikit_learn() -> None:
    import subprocess
    import sys

    code = ("import sys, numpy as np\nfrom cytoretrieve.queries.knn import classify\n"
            "x = np.random.default_rng(0).normal(size=(60, 8))\n"
            "classify(x, ['a', 'b', 'c'] * 20, runs=2, ks=[1, 3])\nprint('sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
