"""Focal planes on the real ISBI 2015 z-stack (issue 28): each single plane, the sharpest plane, the sharpest
plane per tile, our EDF composite and the dataset's own EDF image, compared by sharpness and nucleus detection.

The 20-plane field (`../shared/data/isbi2015_zstack/stack/`, a folder of planes read as one field by the image
backend; 1024 x 1024, grey, mpp 0.25 assumed as for Cervix93) is reduced as `--plane N|best|edf` does
(`sources.slides.planes`). Per image: `sharpness` (variance of the Laplacian, whole image, x 1e4), the focus
score (`sources.slides.focus`) and the classic nucleus detector against the 49 nuclei of `frame011_NUGT.png`
(matched one-to-one within `--match-um`, about one nucleus radius). "best/tile" composes the field from 256 px
tiles, each from its own sharpest plane (what `tile --plane best` reads).

    .venv/bin/python experiments/isbi_planes.py [--json out.json]     # ~20 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2015_zstack"
MPP = 0.25
MATCH_UM = 6.0
TILE = 256


def truth_points(mask_path: Path) -> np.ndarray:
    """Centres (x, y) of the filled nuclei of a mask image."""
    mask = np.asarray(Image.open(mask_path)) > 0
    labels, n = ndimage.label(mask)
    return np.array(ndimage.center_of_mass(mask, labels, range(1, n + 1)))[:, ::-1]


def load_planes(folder: Path) -> list[np.ndarray]:
    """Every plane of the field, uint8 RGB, read through the slide backends as `tile` and `cells` read it."""
    from cytoretrieve.sources.slides.planes import read_planes
    from cytoretrieve.sources.slides.reader import Slide

    with Slide(folder, mpp=MPP, cache_bytes=256 << 20) as slide:
        w, h = slide.info.dimensions
        return read_planes(slide.backend, 0, 0, 0, (w, h))


def best_per_tile(planes: list[np.ndarray], tile: int = TILE) -> np.ndarray:
    from cytoretrieve.sources.slides.planes import best_plane

    out = np.empty_like(planes[0])
    h, w = out.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            i = best_plane([p[y:y + tile, x:x + tile] for p in planes])
            out[y:y + tile, x:x + tile] = planes[i][y:y + tile, x:x + tile]
    return out


def measure(image: np.ndarray, truth: np.ndarray, match_um: float = MATCH_UM) -> dict[str, Any]:
    from cytoretrieve.sources.slides.detectors import get_detector
    from cytoretrieve.sources.slides.detectors.evaluate import count
    from cytoretrieve.sources.slides.focus import focus_score, sharpness

    nuclei = get_detector("classic")(image, MPP)
    c = count(nuclei.xy, truth, match_um / MPP)
    return {"sharpness": sharpness(image) * 1e4, "focus": focus_score(image), "detected": len(nuclei),
            "tp": c.tp, "fp": c.fp, "fn": c.fn, "recall": c.recall, "precision": c.precision, "f1": c.f1}


def compare(data: Path = DATA, match_um: float = MATCH_UM, planes_too: bool = True) -> dict[str, Any]:
    """Rows per image (planes 0..19 when `planes_too`, best, best/tile, our EDF, the dataset's EDF) and the median
    plane's figures."""
    from cytoretrieve.sources.slides.planes import best_plane, edf

    start = time.perf_counter()
    planes = load_planes(data / "stack")
    truth = truth_points(data / "frame011_NUGT.png")
    reference = np.asarray(Image.open(data / "frame011.png").convert("RGB"))
    rows: dict[str, dict[str, Any]] = {}
    if planes_too:
        for i, p in enumerate(planes):
            rows[f"plane {i}"] = measure(p, truth, match_um)
    best = best_plane(planes)
    t = time.perf_counter()
    ours = edf(planes)
    edf_seconds = time.perf_counter() - t
    rows[f"best (plane {best})"] = measure(planes[best], truth, match_um)
    rows["best/tile"] = measure(best_per_tile(planes), truth, match_um)
    rows["our EDF"] = measure(ours, truth, match_um)
    rows["dataset EDF"] = measure(reference, truth, match_um)
    plane_rows = [v for k, v in rows.items() if k.startswith("plane ")]
    median = {k: statistics.median(r[k] for r in plane_rows) for k in ("sharpness", "focus", "tp", "f1")} \
        if plane_rows else {}
    return {"nuclei": len(truth), "mpp": MPP, "match_um": match_um, "best_plane": best, "rows": rows,
            "median_plane": median, "edf_seconds": round(edf_seconds, 2),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--match-um", type=float, default=MATCH_UM)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    out = compare(args.data, args.match_um)
    print(f"ISBI 2015 frame011: {out['nuclei']} nuclei, mpp {MPP} assumed, match within {out['match_um']:g} um")
    print(f"{'image':<18}{'sharp':>8}{'focus':>8}{'found':>7}{'tp':>5}{'fp':>5}{'fn':>5}{'recall':>8}{'prec':>7}{'F1':>7}")
    for name, r in out["rows"].items():
        focus = "" if r["focus"] is None else f"{r['focus']:.3f}"
        print(f"{name:<18}{r['sharpness']:>8.3f}{focus:>8}{r['detected']:>7}{r['tp']:>5}{r['fp']:>5}{r['fn']:>5}"
              f"{r['recall']:>8.3f}{r['precision']:>7.3f}{r['f1']:>7.3f}")
    m = out["median_plane"]
    print(f"median plane: sharpness {m['sharpness']:.3f}, focus {m['focus']:.3f}, tp {m['tp']}, F1 {m['f1']:.3f}; "
          f"EDF {out['edf_seconds']} s; total {out['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
