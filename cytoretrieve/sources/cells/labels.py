"""Label maps: fine class codes, their long names, and what each means in binary (positive / negative / neither).

A label map travels with the embedded table (`to_dict` / `from_dict`), so k-NN evaluation can score fine or binary
labels without knowing which dataset the rows came from. Users supply their own as JSON or CSV (`load_label_map`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError


@dataclass(frozen=True)
class LabelMap:
    """Fine class codes in display order, with code -> binary (1 / 0 / None) and code -> long name."""

    name: str
    classes: tuple[str, ...]
    binary: dict[str, int | None]
    names: dict[str, str]

    def __post_init__(self) -> None:
        if len(set(self.classes)) != len(self.classes):
            raise CytoError(f"label map {self.name!r} lists a class twice: {list(self.classes)}")
        for part in ("binary", "names"):
            extra = sorted(set(getattr(self, part)) - set(self.classes))
            if extra:
                raise CytoError(
                    f"label map {self.name!r}: {part} has codes that are not in classes: {', '.join(extra)}"
                )
        bad = {c: v for c, v in self.binary.items() if v not in (0, 1, None) or isinstance(v, float)}
        if bad:
            raise CytoError(f"label map {self.name!r}: binary values must be 1, 0 or null, got {bad}")

    def binary_of(self, code: str | None) -> int | None:
        """1 / 0 for a positive / negative code; None for a neutral, unknown or missing one."""
        return None if code is None else self.binary.get(code)

    def long_name(self, code: str) -> str:
        """The long name of `code`, or the code itself when the map gives none."""
        return self.names.get(code, code)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (stored in the table metadata); `from_dict` reads it back."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "binary": {c: self.binary.get(c) for c in self.classes},
            "names": {c: self.long_name(c) for c in self.classes},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str | None = None) -> LabelMap:
        """Build a map from {"classes": [...], "binary": {...}, "names": {...}}; classes default to the binary keys.

        Codes missing from `binary` get None and codes missing from `names` are their own name.
        """
        if not isinstance(d, Mapping):
            raise CytoError(f"label map {name or '?'} must be a JSON object with classes, binary and names")
        label = str(d.get("name") or name or "labels")
        binary = d.get("binary") or {}
        names = d.get("names") or {}
        if not isinstance(binary, Mapping) or not isinstance(names, Mapping):
            raise CytoError(f"label map {label!r}: binary and names must be objects mapping code -> value")
        classes = d.get("classes")
        if classes is None:
            classes = list(binary)
        if isinstance(classes, str) or not isinstance(classes, Iterable):
            raise CytoError(f"label map {label!r}: classes must be a list of codes")
        codes = tuple(str(c) for c in classes)
        if not codes:
            raise CytoError(f"label map {label!r} has no classes")
        return cls(
            name=label,
            classes=codes,
            binary={c: None for c in codes} | {str(c): _binary_value(v, label, str(c)) for c, v in binary.items()},
            names={c: c for c in codes} | {str(c): str(v) for c, v in names.items()},
        )

    def check_covers(self, labels: Iterable[str | None], source: str) -> None:
        """Refuse a map that lacks some label of the data: a silent None would hide a typo."""
        missing = sorted({lab for lab in labels if lab is not None} - set(self.classes))
        if missing:
            raise CytoError(
                f"label map {self.name!r} has no entry for {', '.join(missing)} (found in {source}); "
                f"add them (binary null for neither) or fix the names"
            )


def _binary_value(value: Any, label: str, code: str) -> int | None:
    """Accept 1/0/None (and true/false) from JSON; anything else is a user mistake."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise CytoError(f"label map {label!r}: binary of {code!r} must be 1, 0 or null, got {value!r}")


_NULL_WORDS = {"", "null", "none", "na", "n/a", "-"}


def _binary_cell(text: str, path: Path, row: int) -> int | None:
    """Parse the `binary` cell of a CSV label map."""
    word = text.strip().lower()
    if word in _NULL_WORDS:
        return None
    if word in ("1", "true"):
        return 1
    if word in ("0", "false"):
        return 0
    raise CytoError(f"label map {path} row {row}: binary must be 1, 0 or empty, got {text!r}")


def load_label_map(path: str | Path) -> LabelMap:
    """Read a label map from JSON ({"classes", "binary", "names"}) or CSV (header class,binary[,name])."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CytoError(f"label map {path} does not exist; give a .json or .csv file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CytoError(f"cannot read label map {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CytoError(f"label map {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if isinstance(data, Mapping):
            data = {k: v for k, v in data.items() if k != "name"}
        return LabelMap.from_dict(data, name=path.name)
    if suffix == ".csv":
        return _from_csv(text, path)
    raise CytoError(f"label map {path} must be a .json or .csv file")


def _from_csv(text: str, path: Path) -> LabelMap:
    """CSV label map: one row per class, in display order."""
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if "class" not in header or "binary" not in header:
        found = ",".join(header) or "nothing"
        raise CytoError(f"label map {path} needs a header with columns class,binary[,name]; found {found}")
    ci, bi = header.index("class"), header.index("binary")
    ni = header.index("name") if "name" in header else None
    classes: list[str] = []
    binary: dict[str, int | None] = {}
    names: dict[str, str] = {}
    for row_no, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        row = row + [""] * (len(header) - len(row))
        code = row[ci].strip()
        if not code:
            raise CytoError(f"label map {path} row {row_no}: empty class")
        classes.append(code)
        binary[code] = _binary_cell(row[bi], path, row_no)
        if ni is not None and row[ni].strip():
            names[code] = row[ni].strip()
    return LabelMap.from_dict({"classes": classes, "binary": binary, "names": names}, name=path.name)


HERLEV = LabelMap(
    name="herlev",
    classes=("NS", "NI", "NC", "LD", "MD", "SD", "CIS"),
    binary={"NS": 0, "NI": 0, "NC": 0, "LD": 1, "MD": 1, "SD": 1, "CIS": 1},
    names={
        "NS": "normal superficial",
        "NI": "normal intermediate",
        "NC": "normal columnar",
        "LD": "light dysplastic",
        "MD": "moderate dysplastic",
        "SD": "severe dysplastic",
        "CIS": "carcinoma in situ",
    },
)
"""Herlev (smear2005): 3 normal and 4 abnormal classes; abnormal = positive."""

SIPAKMED = LabelMap(
    name="sipakmed",
    classes=("SI", "P", "K", "D", "M"),
    binary={"SI": 0, "P": 0, "K": 1, "D": 1, "M": None},
    names={
        "SI": "superficial-intermediate",
        "P": "parabasal",
        "K": "koilocytotic",
        "D": "dyskeratotic",
        "M": "metaplastic",
    },
)
"""SIPaKMeD: koilocytotic and dyskeratotic are abnormal (positive); metaplastic is benign but not normal, so neither."""

BETHESDA = LabelMap(
    name="bethesda",
    classes=("Negative for intraepithelial lesion", "NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC"),
    binary={"Negative for intraepithelial lesion": 0, "NILM": 0, "ASC-US": 1, "LSIL": 1, "ASC-H": 1, "HSIL": 1,
            "SCC": 1},
    names={
        "Negative for intraepithelial lesion": "negative for intraepithelial lesion or malignancy (NILM)",
        "NILM": "negative for intraepithelial lesion or malignancy",
        "ASC-US": "atypical squamous cells of undetermined significance",
        "LSIL": "low-grade squamous intraepithelial lesion",
        "ASC-H": "atypical squamous cells, cannot exclude HSIL",
        "HSIL": "high-grade squamous intraepithelial lesion",
        "SCC": "squamous cell carcinoma",
    },
)
"""The Bethesda categories as the CRIC Cervix release names its class folders (and NILM, its usual short form):
NILM negative, every other category positive (an abnormal cell). Applied to class folders and manifests whose labels are all among these."""
