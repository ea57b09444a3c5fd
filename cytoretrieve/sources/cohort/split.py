"""Slide-level splits: every slide in exactly one of `folds` folds, stratified by slide label, written once to a
JSON file that the trainer, transfer and MIL scoring all read, so every experiment uses the same splits.

    split = load_split("split.json")
    split.fold_of["case-001"]        # -> 2
    split.test_slides(2)             # slides of fold 2
    split.train_slides(2)            # the others

The file:

    {"kind": "cytoretrieve-split", "version": 1, "folds": 4, "seed": 0, "labels": "slides.csv",
     "slides": [{"slide": "case-001", "label": "NILM", "binary": 0, "fold": 2}, ...],
     "counts": {"0": {"HSIL": 3, "NILM": 5}, ...}}
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cohort.labels import SlideLabel

SPLIT_KIND = "cytoretrieve-split"
SPLIT_VERSION = 1


@dataclass(frozen=True)
class Split:
    folds: int
    seed: int
    fold_of: dict[str, int]  # slide id -> fold
    label_of: dict[str, str]  # slide id -> label
    binary_of: dict[str, int | None]
    source: str | None = None  # the labels file it was made from

    @property
    def slides(self) -> list[str]:
        return sorted(self.fold_of)

    def test_slides(self, fold: int) -> list[str]:
        self._check(fold)
        return sorted(s for s, f in self.fold_of.items() if f == fold)

    def train_slides(self, fold: int) -> list[str]:
        self._check(fold)
        return sorted(s for s, f in self.fold_of.items() if f != fold)

    def _check(self, fold: int) -> None:
        if not 0 <= fold < self.folds:
            raise CytoError(f"fold {fold} does not exist: the split has folds 0-{self.folds - 1}")

    def counts(self) -> dict[int, dict[str, int]]:
        """Slides per label in each fold."""
        out: dict[int, Counter[str]] = {f: Counter() for f in range(self.folds)}
        for s, f in self.fold_of.items():
            out[f][self.label_of[s]] += 1
        return {f: dict(sorted(c.items())) for f, c in out.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": SPLIT_KIND,
            "version": SPLIT_VERSION,
            "folds": self.folds,
            "seed": self.seed,
            "labels": self.source,
            "slides": [{"slide": s, "label": self.label_of[s], "binary": self.binary_of.get(s), "fold": self.fold_of[s]}
                       for s in self.slides],
            "counts": {str(f): c for f, c in self.counts().items()},
        }


def make_split(labels: dict[str, SlideLabel], folds: int = 4, seed: int = 0, source: str | None = None) -> tuple[Split, list[str]]:
    """Stratified K-fold over slides (sorted by id, so the CSV's row order does not matter); returns the split
    and warnings (a label with fewer slides than folds cannot be in every fold)."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise CytoError(f"`folds` must be at least 2, not {folds}")
    unlabelled = sorted(s for s, lab in labels.items() if not lab.label)
    if unlabelled:
        raise CytoError(f"{len(unlabelled)} slide(s) have no label, a split needs one for each: {', '.join(unlabelled[:5])}")
    slides = sorted(labels)
    if len(slides) < folds:
        raise CytoError(f"{len(slides)} slides cannot make {folds} folds")
    y = [labels[s].label for s in slides]
    counts = Counter(y)
    notes = [f"label '{lab}' has {n} slide(s), fewer than {folds} folds: some folds have none"
             for lab, n in sorted(counts.items()) if n < folds]
    fold_of: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the least-populated-class warning: reported in `notes`
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for fold, (_, test) in enumerate(skf.split(slides, y)):
            for i in test:
                fold_of[slides[i]] = fold
    split = Split(
        folds=folds, seed=seed, fold_of=fold_of,
        label_of={s: labels[s].label for s in slides},  # type: ignore[misc]
        binary_of={s: labels[s].binary for s in slides}, source=source,
    )
    return split, notes


def write_split(split: Split, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split.to_dict(), indent=2) + "\n")
    return path


def load_split(path: str | Path) -> Split:
    """Read a split file written by `cytoretrieve split`; anything else is a `CytoError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CytoError(f"no split file {path}: make one with `cytoretrieve split`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CytoError(f"split file {path} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != SPLIT_KIND:
        raise CytoError(f"{path} is not a cytoretrieve split file")
    if data.get("version") != SPLIT_VERSION:
        raise CytoError(f"split file {path} has version {data.get('version')}, this cytoretrieve reads {SPLIT_VERSION}")
    try:
        folds = int(data["folds"])
        slides = data["slides"]
        fold_of = {str(r["slide"]): int(r["fold"]) for r in slides}
        label_of = {str(r["slide"]): str(r["label"]) for r in slides}
        binary_of = {str(r["slide"]): r.get("binary") for r in slides}
    except (KeyError, TypeError, ValueError) as e:
        raise CytoError(f"split file {path} is malformed ({type(e).__name__}: {e})") from None
    if any(not 0 <= f < folds for f in fold_of.values()):
        raise CytoError(f"split file {path} assigns a fold outside 0-{folds - 1}")
    return Split(folds=folds, seed=int(data.get("seed", 0)), fold_of=fold_of, label_of=label_of,
                 binary_of=binary_of, source=data.get("labels"))
