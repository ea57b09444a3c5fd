"""Field-level scoring on Cervix93 (issue 23): bags of detected cells vs bags of grid tiles, same backbone.

The 93 real fields (grey EDF, 1280 x 960, `--mpp` assumed) get their grade as the label (N negative, L and H
positive). Each field becomes two bags:
- **cells**: the `cells` job (classic detector), one `--crop-um` crop per nucleus;
- **tiles**: the `tile` job's grid of squares of the same size and pixel size, every grid tile of the field.
Both tables are embedded by the same backbone (`--arch`, `--weights`: random by default, the only weights an
offline machine has) and scored by `score` (`--methods`) under stratified 4-fold CV over the fields, for each of
`--seeds` split seeds. Printed: AUC mean +- std over seeds per (bags, method), and the paired difference.

    .venv/bin/python experiments/cervix93_fields.py --json out/c93_fields.json    # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cervix93"


def write_labels(folder: Path) -> Path:
    """`slide,label,binary` of the 93 fields: the grade, N negative, L and H positive."""
    path = folder / "grades.csv"
    with (DATA / "labels.csv").open() as f, path.open("w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["slide", "label", "binary"])
        for row in csv.DictReader(f):
            w.writerow([row["frame"], row["label"], int(row["label"] != "N")])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--crop-um", type=float, default=48.0)
    ap.add_argument("--size", type=int, default=128, help="crop and tile side in px")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--methods", default="mean,abmil")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from cytoretrieve.jobs.cells import expand_sources, find_cells_in
    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.jobs.tile import tile_slides
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.queries.mil.score import score_table
    from cytoretrieve.queries.mil.train import MILTrainConfig
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.cohort.split import make_split, write_split
    from cytoretrieve.sources.slides.cells import CellSpec
    from cytoretrieve.sources.slides.deposit import DepositParams
    from cytoretrieve.sources.slides.grid import GridSpec
    from cytoretrieve.store.tables import Store

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="c93-fields-"))
    store = Store(work / "store")
    labels_csv = write_labels(work)
    labels = read_labels(labels_csv)
    fields = sorted((DATA / "EDF").glob("frame*.png"))
    spec = CellSpec(crop_um=args.crop_um, cell_size=args.size)
    cells = find_cells_in(expand_sources(fields, mpp=args.mpp, labels=labels), store, table="c93_cells", spec=spec)
    # a field is smaller than the cells rule's smallest deposit region: every grid tile of the field is kept
    tiles = tile_slides(fields, store, table="c93_tiles", labels=labels, mpp=args.mpp,
                        spec=GridSpec(tile_size=args.size, target_mpp=spec.crop_mpp, rule="coverage", min_coverage=0.0),
                        params=DepositParams(method="grey"))
    n_cells, n_tiles = cells.cells_added, tiles.tiles_added
    print(f"{len(fields)} fields: {n_cells} cells, {n_tiles} tiles ({time.perf_counter() - start:.0f} s)", flush=True)
    backbone = load_backbone(args.arch, args.weights, image_size=args.image_size)
    for table in ("c93_cells", "c93_tiles"):
        embed(table, backbone, store, table=f"{table}_emb", workers=0)
    print(f"embedded ({time.perf_counter() - start:.0f} s)", flush=True)

    aucs: dict[str, dict[str, list[float]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        split = write_split(make_split(labels, folds=4, seed=seed)[0], work / f"split{seed}.json")
        for method in args.methods.split(","):
            for bags in ("cells", "tiles"):
                cv = score_table(store, f"c93_{bags}_emb", labels_csv, split, method,
                                 train_config=MILTrainConfig(seed=seed))[0]
                aucs.setdefault(method, {}).setdefault(bags, []).append(float(cv.mean["auc"]))
                print(f"seed {seed} {method:>6} bags of {bags}: AUC {cv.mean['auc']:.3f}", flush=True)
    summary = {}
    print(f"\n{'method':<8}{'cells':>16}{'tiles':>16}{'cells - tiles':>18}")
    for method, by in aucs.items():
        diff = [c - t for c, t in zip(by["cells"], by["tiles"])]
        row = {k: (statistics.mean(v), statistics.pstdev(v)) for k, v in by.items()}
        row["diff"] = (statistics.mean(diff), statistics.pstdev(diff))
        summary[method] = row
        print(f"{method:<8}" + "".join(f"{row[k][0]:>10.3f} +- {row[k][1]:.3f}" for k in ("cells", "tiles", "diff")))
    result = {"fields": len(fields), "cells": n_cells, "tiles": n_tiles, "args": vars(args), "auc": aucs,
              "summary": summary, "seconds": time.perf_counter() - start}
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
