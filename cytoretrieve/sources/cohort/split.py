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

`load_split` is the one reader of splits: it also takes a CSV `slide,fold` or a JSON object {slide: fold}.
"""

from __future__ import annotations

import csv
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
UNLABELLED = ""  # the label of a slide that a simple split (CSV, JSON mapping) gives none


@dataclass(frozen=True)
class Split:
    folds: int
    seed: int
    fold_of: dict[str, int]  # slide id -> fold
    label_of: dict[str, str]  # slide id -> label (simple splits: only the slides they label)
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
            out[f][self.label_of.get(s, UNLABELLED)] += 1
        return {f: dict(sorted(c.items())) for f, c in out.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": SPLIT_KIND,
            "version": SPLIT_VERSION,
            "folds": self.folds,
            "seed": self.seed,
            "labels": self.source,
            "slides": [{"slide": s, "label": self.label_of.get(s, UNLABELLED), "binary": self.binary_of.get(s), "fold": self.fold_of[s]}
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
    """Read a split in any of the formats the package accepts (the one reader of splits):

    - the JSON `cytoretrieve split` writes (kind, version, folds, seed, slides with label and fold);
    - a JSON object {slide: fold};
    - a CSV with the columns `slide,fold` (a `label` and a `binary` column are read where present).

    Folds are integers >= 0; the simple formats have max(fold) + 1 folds. Anything else is a `CytoError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CytoError(f"no split file {path}: make one with `cytoretrieve split`")
    try:
        if path.suffix.lower() == ".json":
            return _read_json_split(path, json.loads(path.read_text()))
        return _read_csv_split(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CytoError(f"could not read split file {path}: {str(e).splitlines()[0] if str(e) else e}") from None


def _read_json_split(path: Path, data: Any) -> Split:
    if isinstance(data, dict) and "kind" in data:
        return _read_split_file(path, data)
    if not isinstance(data, dict) or not data or not all(isinstance(v, (int, str)) for v in data.values()):
        raise CytoError(f"{path} is not a cytoretrieve split file, nor a JSON object mapping slide ids to folds")
    return _simple_split(path, [{"slide": k, "fold": v} for k, v in data.items()])


def _read_csv_split(path: Path) -> Split:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in reader.fieldnames or []]
        if "slide" not in fields or "fold" not in fields:
            raise CytoError(f"split file {path} needs the columns slide,fold (found: {', '.join(fields) or 'none'})")
        rows = [{str(k).strip().lower(): v for k, v in row.items()} for row in reader]
    return _simple_split(path, rows)


def _simple_split(path: Path, rows: list[dict[str, Any]]) -> Split:
    """A split from rows with `slide`, `fold` and optionally `label`, `binary` (a CSV or a JSON mapping)."""
    fold_of: dict[str, int] = {}
    label_of: dict[str, str] = {}
    binary_of: dict[str, int | None] = {}
    for row in rows:
        slide, fold = str(row["slide"]).strip(), row["fold"]
        try:
            fold_of[slide] = int(str(fold).strip())
        except ValueError:
            raise CytoError(f"split file {path}: fold {fold!r} of slide {slide!r} is not an integer") from None
        if fold_of[slide] < 0:
            raise CytoError(f"split file {path}: fold {fold_of[slide]} of slide {slide!r} is negative")
        if str(row.get("label") or "").strip():
            label_of[slide] = str(row["label"]).strip()
        binary = str(row.get("binary") or "").strip()
        binary_of[slide] = int(binary) if binary in ("0", "1") else None
    if not fold_of:
        raise CytoError(f"split file {path} lists no slides")
    return Split(folds=max(fold_of.values()) + 1, seed=0, fold_of=fold_of, label_of=label_of, binary_of=binary_of,
                 source=None)


def _read_split_file(path: Path, data: dict[str, Any]) -> Split:
    """The JSON `cytoretrieve split` writes, checked."""
    if data.get("kind") != SPLIT_KIND:
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
