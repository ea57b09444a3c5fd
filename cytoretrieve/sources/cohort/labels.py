"""The slide labels CSV: a header with `slide` and `label`, optionally `binary` (1 positive, 0 negative, empty
unknown) and `path` (the slide file, relative to the CSV).

    slide,label,binary
    case-001,NILM,0
    case-002,HSIL,1

`slide` is the slide id: the file name without its slide suffix (`case-001.svs` and `case-001` both name slide
`case-001`).

Also here: `expand_slides` (files and folders -> slide files, missing paths and duplicate ids refused) and the
checks that labels name only slides that exist (`match_labels`, `slides_from_labels`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cytoretrieve.errors import CytoError
from cytoretrieve.ids import SLIDE_EXTENSIONS, slide_id


@dataclass(frozen=True)
class SlideLabel:
    slide: str
    label: str | None
    binary: int | None = None
    path: str | None = None  # absolute, when the CSV has a path column


def read_labels(path: str | Path) -> dict[str, SlideLabel]:
    """Slide id -> label from a labels CSV; a malformed file is a `CytoError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise CytoError(f"no labels file {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "slide" not in fields or "label" not in fields:
                raise CytoError(f"labels file {path} needs a header with columns slide,label[,binary][,path] "
                                f"(found: {','.join(reader.fieldnames or []) or 'nothing'})")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError:
        raise CytoError(f"labels file {path} is not a text CSV") from None
    labels: dict[str, SlideLabel] = {}
    for line, row in enumerate(rows, start=2):
        if not row.get("slide"):
            if any(row.values()):
                raise CytoError(f"{path}:{line}: no slide id")
            continue
        sid = slide_id(row["slide"])
        binary = row.get("binary", "")
        if binary not in ("", "0", "1"):
            raise CytoError(f"{path}:{line}: binary must be 1, 0 or empty, not {binary!r}")
        file = row.get("path") or None
        entry = SlideLabel(
            slide=sid,
            label=row["label"] or None,
            binary=int(binary) if binary else None,
            path=str((path.parent / file).absolute()) if file else None,
        )
        if sid in labels and labels[sid] != entry:
            raise CytoError(f"{path}:{line}: slide '{sid}' is listed twice with different labels")
        labels[sid] = entry
    if not labels:
        raise CytoError(f"labels file {path} lists no slides")
    return labels


def expand_slides(paths: Sequence[str | Path]) -> list[Path]:
    """Slide files from files and folders (a folder gives its files with a slide suffix); a path that does not
    exist, a folder without slides, or two slides with the same id are user errors."""
    out: list[Path] = []
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise CytoError(f"no such slide: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SLIDE_EXTENSIONS)
            if not found:
                raise CytoError(f"no slide files ({', '.join(SLIDE_EXTENSIONS)}) in folder {p}")
            out.extend(found)
        else:
            out.append(p)
    unique: dict[str, Path] = {}
    for p in out:
        sid = slide_id(p)
        if sid in unique and unique[sid].absolute() != p.absolute():
            raise CytoError(f"two slides have the id '{sid}': {unique[sid]} and {p} (rename one)")
        unique.setdefault(sid, p)
    return list(unique.values())


def match_labels(slides: Sequence[Path], labels: dict[str, SlideLabel]) -> dict[str, SlideLabel]:
    """The label of each given slide; labels naming slides that are not given are a user error."""
    ids = {slide_id(p) for p in slides}
    unknown = sorted(set(labels) - ids)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise CytoError(f"the labels name {len(unknown)} slide(s) that are not among the {len(ids)} given: {shown}")
    return {sid: lab for sid, lab in labels.items() if sid in ids}


def slides_from_labels(labels: dict[str, SlideLabel]) -> list[Path]:
    """The slide files a labels CSV lists in its `path` column; files that do not exist are a user error."""
    if any(lab.path is None for lab in labels.values()):
        raise CytoError("no slides given: pass SLIDES, or a labels CSV with a path column for every slide")
    missing = sorted(sid for sid, lab in labels.items() if not Path(lab.path).exists())  # type: ignore[arg-type]
    if missing:
        raise CytoError(f"the labels name {len(missing)} slide(s) whose files do not exist: {', '.join(missing[:5])}")
    return [Path(lab.path) for lab in labels.values()]  # type: ignore[arg-type]
