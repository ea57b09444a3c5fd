"""The paper's two findings on public data (issue 29): a Table-3-shaped summary from Herlev, CRIC and Cervix93.

Finding (1): features learned from single-cell datasets do not generalise to images of several cells;
finding (2): pasting cells onto backgrounds during pre-training makes them generalise.

    OMP_NUM_THREADS=2 nice -n 19 .venv/bin/python experiments/public_findings.py --workdir /work/public_findings \\
        --epochs 2 --seeds 0 [--conditions herlev,paste,c93] [--no-train]

Backbones (rows), each pre-trained with `cytoretrieve train --recipe tiny` (resnet18 at 64 px) for the same number
of optimizer steps, for each seed:
- `herlev`: the 917 Herlev cells alone;
- `paste`: the CRIC crops as backgrounds with Herlev cells pasted onto them (`--paste-cells`, `--paste-p 1`: every
  image is a composite of several cells); no Cervix93 field is ever seen;
- `c93`: grid tiles of the 69 Cervix93 TRAINING fields (unlabelled; never a test field): the paper's own setting in
  miniature;
- `herlev_grey`: the Herlev cells with every view grey (`--grayscale-p 1`), for the grey columns: the fields are
  grey, so a cell-trained backbone meant for them would be pre-trained in grey (not in the default conditions);
baselines: `random` (the same architecture at its seeded random init) and `pixels` (32 x 32 pixels minus the mean
image of the dataset, as in `dino_knn.py`; grey for everything compared with the grey fields).
`--epochs` is the budget in Herlev epochs: every condition runs `round(epochs * 917 / its images)` epochs (at
least 1) of its own data, so all see about the same number of images and steps.

Evaluation of each backbone (columns), paired over the same splits for every backbone:
- cells -> cells: Herlev 7-class k-NN weighted F1 (`classify`, weighted vote, k* by mean F1, `--paired-runs`
  seeded 75/25 splits), in colour and in grey (each image converted to grey, channel repeated);
- cells -> tiles and cells -> cell crops: transfer (`select_k` + `knn_predict`, the functions `transfer` runs,
  majority vote, k by 5-fold CV on the support) with the Herlev binary labels (grey Herlev) as support, onto the
  grid tiles and the detected cell crops of the 24 Cervix93 TEST fields; the label of a tile / crop is its field's
  grade (N negative, L and H positive): sensitivity, specificity, balanced accuracy;
- field level: `cross_validate` (what `score` runs), method `mean`, over the 93 fields as bags of cells and as bags
  of tiles, 4 stratified folds for each of `--split-seeds`, 16 bags per MIL training step: AUC.

Resumable: every pre-training run (`runs/<cond>_s<seed>`, continued with `--resume` when interrupted), every
backbone's features (`features/<name>.npz`) and every evaluation (`eval/<name>.json`, one file per field AUC) is
kept under --workdir and
skipped when present; the Cervix93 tile and cell tables are made once (`c93/`). Run it again with more seeds or
another `--epochs` (a new `--tag`) to extend the table. Prints the summary table; `--json` keeps every number.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from dino_knn import CRIC, HERLEV, log_summary, pixels  # noqa: E402

C93 = ROOT.parent / "shared" / "data" / "cervix93"
HERLEV_N = 917
CONDITIONS = ("herlev", "paste", "c93", "herlev_grey")
MPP, CROP_UM, SIZE = 0.25, 48.0, 128  # as experiments/cervix93_fields.py: the field pixel size is an estimate
MIL_BATCH = 16  # bags per MIL training step (`score`'s default 1 is ~10x slower on 93 bags; the same for all)
COLUMNS = ("cells_cells", "cells_cells_grey", "cells_tiles", "cells_crops", "field_cells", "field_tiles")


# ------------------------------------------------------------------------------------------------ data, made once


def grades() -> dict[str, tuple[str, int]]:
    """{field: (grade, set)} from labels.csv; set 0 = train, 1 = test."""
    with (C93 / "labels.csv").open() as f:
        return {r["frame"]: (r["label"], int(r["set"])) for r in csv.DictReader(f)}


def prepare(work: Path) -> dict:
    """The Cervix93 tables (cell crops and grid tiles of all 93 fields, grid tiles of the 69 training fields) and a
    grey copy of Herlev, made once into `work/c93` and `work/herlev_grey`."""
    done = work / "c93" / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    from PIL import Image

    from cytoretrieve.jobs.cells import expand_sources, find_cells_in
    from cytoretrieve.jobs.tile import tile_slides
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.slides.cells import CellSpec
    from cytoretrieve.sources.slides.deposit import DepositParams
    from cytoretrieve.sources.slides.grid import GridSpec
    from cytoretrieve.store.tables import Store

    t0 = time.perf_counter()
    folder = work / "c93"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = os.getpid()  # a crashed earlier attempt may have left half a table: never append to it
    store = Store(folder / "store")
    labels_csv = folder / "grades.csv"
    with labels_csv.open("w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["slide", "label", "binary"])
        for field, (grade, _) in sorted(grades().items()):
            w.writerow([field, grade, int(grade != "N")])
    labels = read_labels(labels_csv)
    fields = sorted((C93 / "EDF").glob("frame*.png"))
    train_fields = [p for p in fields if grades()[p.stem][1] == 0]
    spec = CellSpec(crop_um=CROP_UM, cell_size=SIZE)
    grid = GridSpec(tile_size=SIZE, target_mpp=spec.crop_mpp, rule="coverage", min_coverage=0.0)
    names = {k: f"{k}_{stamp}" for k in ("cells", "tiles", "train_tiles")}
    cells = find_cells_in(expand_sources(fields, mpp=MPP, labels=labels), store, table=names["cells"], spec=spec)
    tiles = tile_slides(fields, store, table=names["tiles"], labels=labels, mpp=MPP, spec=grid,
                        params=DepositParams(method="grey"))
    train = tile_slides(train_fields, store, table=names["train_tiles"], mpp=MPP, spec=grid,
                        params=DepositParams(method="grey"))
    grey = work / "herlev_grey"
    from cytoretrieve.sources.cells import open_dataset

    for r in open_dataset(HERLEV).records:
        dst = grey / Path(r.id).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(r.path).convert("L").save(dst)
    info = {"tables": names, "labels": str(labels_csv), "store": str(folder / "store"), "cells": cells.cells_added,
            "tiles": tiles.tiles_added, "train_tiles": train.tiles_added, "fields": len(fields),
            "train_fields": len(train_fields), "seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(info, indent=2) + "\n")
    print(f"prepared: {info}", flush=True)
    return info


# ------------------------------------------------------------------------------------------------ pre-training


def images_of(cond: str, info: dict) -> int:
    """How many training images the condition's data holds."""
    if cond in ("herlev", "herlev_grey"):
        return HERLEV_N
    if cond == "paste":
        return sum(1 for p in CRIC.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return int(info["train_tiles"])


def train_command(cond: str, seed: int, epochs: int, run: Path, info: dict) -> list[str]:
    """`cytoretrieve train` of one condition: the tiny recipe, one seed, no DataLoader worker (2 shared cores)."""
    cmd = [str(ROOT / ".venv" / "bin" / "cytoretrieve"), "train", "--recipe", "tiny", "--epochs", str(epochs),
           "--seed", str(seed), "--workers", "0", "--out", str(run)]
    if cond in ("herlev", "herlev_grey"):
        cmd += ["--data", str(HERLEV)] + (["--grayscale-p", "1"] if cond == "herlev_grey" else [])
    elif cond == "paste":
        cmd += ["--data", str(CRIC), "--paste-cells", str(HERLEV), "--paste-p", "1"]
    else:
        cmd += ["--data", info["tables"]["train_tiles"], "--store", info["store"]]
    return cmd


def finished(run: Path) -> float | None:
    """Training seconds of a run whose log ends at its planned last step (summed over resumed parts), else None."""
    log = run / "log.jsonl"
    if not (run / "checkpoint.pth").exists() or not log.exists():
        return None
    events = [json.loads(s) for s in log.read_text().splitlines() if '"event"' in s]
    starts, ends = [e for e in events if e["event"] == "start"], [e for e in events if e["event"] == "end"]
    if not starts or not ends or ends[-1]["step"] < starts[-1]["total_steps"]:
        return None
    return round(sum(e["seconds"] for e in ends), 1)


def pretrain(work: Path, cond: str, seed: int, budget: int, tag: str, info: dict) -> Path | None:
    """Train (or resume) one run; its folder once finished (`done.json`), None when --no-train left it undone."""
    run = work / "runs" / f"{cond}_s{seed}{tag}"
    if (run / "done.json").exists():
        return run
    epochs = max(1, round(budget * HERLEV_N / images_of(cond, info)))
    cmd = train_command(cond, seed, epochs, run, info)
    seconds = finished(run)
    if seconds is None:  # not trained, or interrupted: (continue to) train
        if (run / "checkpoint.pth").exists():
            cmd.append("--resume")
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        seconds = finished(run)
    (run / "done.json").write_text(json.dumps({"command": shlex.join(cmd), "epochs": epochs, "train_s": seconds,
                                               "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                                               "log": log_summary(run)}, indent=2) + "\n")
    print(f"trained {run.name}: {seconds:.0f} s", flush=True)
    return run


# ------------------------------------------------------------------------------------------------ features


def _stem(ids: list[str]) -> list[str]:
    return [str(Path(i).with_suffix("")) for i in ids]


def _sorted(vectors, ids: list[str], *cols: list):  # noqa: ANN001, ANN202
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return (vectors[order], [ids[i] for i in order], *([c[i] for i in order] for c in cols))


def backbone_features(backbone, info: dict, work: Path, name: str) -> dict:  # noqa: ANN001
    """Vectors of Herlev (colour, grey) and of the Cervix93 cell crops and tiles, by `embed` (each into a table of
    the Cervix93 store), sorted by id."""
    import numpy as np

    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.store.tables import Store

    store = Store(info["store"])
    stamp = os.getpid()
    out: dict = {}
    for key, source in (("herlev", HERLEV), ("herlev_grey", work / "herlev_grey"),
                        ("c93_cells", info["tables"]["cells"]), ("c93_tiles", info["tables"]["tiles"])):
        table = f"v_{name}_{key}_{stamp}"
        embed(source, backbone, store, table=table, device="cpu", workers=0)
        t = store.open(table)
        cols = ["id", "label", "binary"] if key.startswith("herlev") else ["id", "slide"]
        vectors, meta = t.vectors(cols)
        vectors, ids, *rest = _sorted(vectors, _stem(meta.column("id").to_pylist()),
                                      *(meta.column(c).to_pylist() for c in cols[1:]))
        out[key] = np.asarray(vectors, dtype=np.float32)
        out[f"{key}_ids"] = np.array(ids)
        for c, v in zip(cols[1:], rest):
            out[f"{key}_{c}"] = np.array([-1 if x is None else x for x in v]) if c == "binary" else np.array(v)
    return out


def pixel_features(info: dict) -> dict:
    """The pixel baseline's vectors: Herlev 32 x 32 RGB and grey, Cervix93 crops and tiles 32 x 32 grey."""
    import numpy as np
    from PIL import Image

    from cytoretrieve.sources.cells import open_dataset
    from cytoretrieve.sources.slides.reader import SlideReader
    from cytoretrieve.store.tables import Store
    from cytoretrieve.store.tiles import SHARED_COLUMNS, open_tile_table

    records = sorted(open_dataset(HERLEV).records, key=lambda r: r.id)
    out: dict = {}
    for key, mode in (("herlev", "RGB"), ("herlev_grey", "L")):
        x, labels, ids = pixels(32, mode)
        out[key], out[f"{key}_ids"], out[f"{key}_label"] = x, np.array(_stem(ids)), np.array(labels)
        out[f"{key}_binary"] = np.array([-1 if r.binary is None else r.binary for r in records])
    reader, store = SlideReader(), Store(info["store"])
    for key in ("cells", "tiles"):
        rows = open_tile_table(store, info["tables"][key]).rows([*SHARED_COLUMNS, "read_size"])
        rows.sort(key=lambda r: r["id"])
        out[f"c93_{key}"] = np.stack([np.asarray(reader.read_row(r).convert("L").resize(
            (32, 32), Image.Resampling.BILINEAR), dtype=np.float32).ravel() for r in rows])
        out[f"c93_{key}_ids"] = np.array([r["id"] for r in rows])
        out[f"c93_{key}_slide"] = np.array([r["slide"] for r in rows])
    return out


def features(work: Path, name: str, info: dict, run: Path | None) -> dict:
    """The cached features of backbone `name` (computing them once): pixels, random init or a run's teacher."""
    import numpy as np

    path = work / "features" / f"{name}.npz"
    if not path.exists():
        t0 = time.perf_counter()
        if name == "pixels":
            feats = pixel_features(info)
        else:
            from cytoretrieve.models.backbones import load_backbone

            if run is None:
                backbone = load_backbone("resnet18", "random", image_size=64, resize="letterbox", device="cpu")
            else:
                from cytoretrieve.train.export import export

                rep = export(run / "checkpoint.pth", work / "features" / f"{name}.safetensors")
                backbone = load_backbone(None, str(rep.weights), device="cpu")
            feats = backbone_features(backbone, info, work, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".tmp.npz"), **feats)
        path.with_suffix(".tmp.npz").replace(path)
        print(f"features {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------------------ evaluation


def centre(x, ref=None):  # noqa: ANN001, ANN201
    """`x` minus the mean of `ref` (default `x`): the pixel baseline's centring."""
    return x - (x if ref is None else ref).mean(0)


def cells_cells(x, labels, runs: int) -> dict:  # noqa: ANN001
    from cytoretrieve.queries.knn import classify

    r = classify(x, list(labels), vote="weighted", runs=runs)
    return {"f1": r.weighted_f1_mean, "std": r.weighted_f1_std, "k": r.k_best,
            "runs": [float(v) for v in r.weighted_f1_runs]}


def transfer_to(sx, sy, tx, ty) -> dict:  # noqa: ANN001
    """`transfer`'s steps on vectors: k by 5-fold CV on the support (majority vote), then every target row's vote."""
    import numpy as np

    from cytoretrieve.queries.knn import knn_predict
    from cytoretrieve.queries.transfer import select_k

    k, _, _ = select_k(sx, sy, folds=5, vote="majority", seed=0)
    pred = knn_predict(sx, sy, tx, k, vote="majority", n_classes=2)
    tp, fn = int(((pred == 1) & (ty == 1)).sum()), int(((pred == 0) & (ty == 1)).sum())
    tn, fp = int(((pred == 0) & (ty == 0)).sum()), int(((pred == 1) & (ty == 0)).sum())
    sens, spec = tp / max(tp + fn, 1), tn / max(tn + fp, 1)
    return {"k": int(k), "sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2,
            "confusion": [[tn, fp], [fn, tp]], "predicted_positive": float(np.mean(pred == 1))}


def field_auc(x, slides, labels_csv: str, split_seed: int) -> float:  # noqa: ANN001
    """AUC of the `mean` MIL method over the 93 fields (bags of `x` grouped by field), 4 stratified folds."""
    import numpy as np

    from cytoretrieve.queries.mil.bags import Bags
    from cytoretrieve.queries.mil.evaluate import cross_validate
    from cytoretrieve.queries.mil.train import MILTrainConfig
    from cytoretrieve.sources.cohort.labels import read_labels
    from cytoretrieve.sources.cohort.split import make_split

    labels = read_labels(labels_csv)
    names = sorted(set(slides.tolist()))
    bags = Bags(names=names, y=np.array([labels[n].binary for n in names]),
                vectors=[np.ascontiguousarray(x[slides == n], dtype=np.float32) for n in names])
    cv = cross_validate(bags, make_split(labels, folds=4, seed=split_seed)[0], "mean",
                        train_config=MILTrainConfig(seed=split_seed, device="cpu", batch_size=MIL_BATCH))
    return float(cv.mean["auc"])


def evaluate(feats: dict, info: dict, *, centred: bool, runs: int) -> dict:
    """The k-NN columns for one backbone's features (`centred`: each set minus its mean image, the pixel
    baseline); the field columns are `field_columns`."""
    import numpy as np

    g = grades()
    c = centre if centred else (lambda x, ref=None: x)
    out: dict = {}
    for key, col in (("herlev", "cells_cells"), ("herlev_grey", "cells_cells_grey")):
        out[col] = cells_cells(c(feats[key]), feats[f"{key}_label"], runs)
    for support in ("herlev_grey", "herlev"):
        keep = feats[f"{support}_binary"] >= 0
        sx, sy = feats[support][keep], feats[f"{support}_binary"][keep].astype(np.int64)
        for key, col in (("c93_tiles", "cells_tiles"), ("c93_cells", "cells_crops")):
            if support == "herlev" and sx.shape[1] != feats[key].shape[1]:
                continue  # RGB pixels cannot be compared with grey crops
            test = np.array([g[s][1] == 1 for s in feats[f"{key}_slide"]])
            tx = feats[key][test]
            ty = np.array([int(g[s][0] != "N") for s in feats[f"{key}_slide"][test]])
            r = transfer_to(c(sx), sy, c(tx, sx), ty)  # centred by the support's mean: no target statistics
            out[col if support == "herlev_grey" else f"{col}_colour_support"] = {**r, "n": len(ty),
                                                                                 "positives": int(ty.sum())}
    return out


def field_columns(work: Path, name: str, feats: dict, info: dict, split_seeds: list[int]) -> dict:
    """Field AUC of bags of cells and of tiles for each split seed, each (backbone, bags, seed) cached on its own
    (`eval/<name>_<column>_b<MIL batch>_s<seed>.json`: the MIL cross-validation is the slow part)."""
    out: dict = {}
    for key, col in (("c93_cells", "field_cells"), ("c93_tiles", "field_tiles")):
        aucs = []
        for seed in split_seeds:
            path = work / "eval" / f"{name}_{col}_b{MIL_BATCH}_s{seed}.json"
            if not path.exists():
                x = feats[key] - feats[key].mean(0) if name == "pixels" else feats[key]
                t0 = time.perf_counter()
                auc = field_auc(x, feats[f"{key}_slide"], info["labels"], seed)
                path.write_text(json.dumps({"auc": auc, "split_seed": seed, "seconds": round(time.perf_counter() - t0, 1)})
                                + "\n")
                print(f"{name} {col} split seed {seed}: AUC {auc:.3f}", flush=True)
            aucs.append(json.loads(path.read_text())["auc"])
        out[col] = {"auc": statistics.mean(aucs), "runs": aucs, "split_seeds": split_seeds}
    return out


def evaluation(work: Path, name: str, info: dict, run: Path | None, args: argparse.Namespace) -> dict:
    """The cached evaluation of backbone `name` (computed once)."""
    path = work / "eval" / f"{name}.json"
    feats = features(work, name, info, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        t0 = time.perf_counter()
        result = {"name": name, "run": str(run) if run else None,
                  "eval": evaluate(feats, info, centred=name == "pixels", runs=args.paired_runs),
                  "seconds": round(time.perf_counter() - t0, 1),
                  "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        if run is not None:
            result["train"] = json.loads((run / "done.json").read_text())
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"evaluated {name} (k-NN columns): {result['seconds']:.0f} s", flush=True)
    result = json.loads(path.read_text())
    result["eval"].update(field_columns(work, name, feats, info, args.split_seeds))
    return result


# ------------------------------------------------------------------------------------------------ summary


def value(ev: dict, col: str) -> float:
    e = ev[col]
    return e["f1"] if "f1" in e else e["balanced_accuracy"] if "balanced_accuracy" in e else e["auc"]


def summarise(results: dict[str, list[dict]]) -> tuple[str, dict]:
    """The table (rows: backbones; mean +- std over seeds, or over splits / split seeds with one seed) and the
    paired differences of each trained backbone against random init and pixels, per split, pooled over seeds."""
    import numpy as np

    head = ("backbone", "seeds", "cells->cells", "(grey)", "cells->tiles", "cells->crops", "field AUC cells",
            "field AUC tiles")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table: dict = {}
    for name, evs in results.items():
        row = {}
        for col in COLUMNS:
            vals = [value(e["eval"], col) for e in evs]
            if len(vals) > 1:
                spread = statistics.pstdev(vals)
            else:
                inner = evs[0]["eval"][col].get("runs")
                spread = statistics.pstdev(inner) if inner else float("nan")
            row[col] = (statistics.mean(vals), spread)
        table[name] = row
        cells = [f"{m:.3f} +- {s:.3f}" if s == s else f"{m:.3f}" for m, s in row.values()]
        lines.append(f"| {name} | {len(evs)} | " + " | ".join(cells) + " |")
    diffs: dict = {}
    for name, evs in results.items():
        if name in ("random", "pixels"):
            continue
        for base in ("random", "pixels", "herlev"):
            if base not in results or base == name or len(results[base]) not in (1, len(evs)):
                continue
            pairs = list(zip(evs, results[base] * (len(evs) if len(results[base]) == 1 else 1)))  # seed with seed
            for col in ("cells_cells", "cells_cells_grey", "field_cells", "field_tiles"):
                key = "auc" if col.startswith("field") else "f1"
                d = np.concatenate([np.asarray(e["eval"][col]["runs"]) - np.asarray(b["eval"][col]["runs"])
                                    for e, b in pairs])
                sem = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
                diffs[f"{name} - {base}: {col} {key}"] = {"mean": float(d.mean()), "sem": sem,
                                                          "won": int((d > 0).sum()), "of": len(d)}
    lines.append("")
    for k, d in diffs.items():
        lines.append(f"{k}: {d['mean']:+.3f} +- {d['sem']:.3f} (SEM), won {d['won']} of {d['of']}")
    return "\n".join(lines), {"table": table, "paired": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, type=Path, help="runs, features and evaluations (resumable)")
    ap.add_argument("--epochs", type=int, default=2, help="budget in Herlev epochs, the same for every condition")
    ap.add_argument("--seeds", default="0", help="pre-training seeds, comma-separated")
    ap.add_argument("--conditions", default=",".join(CONDITIONS[:3]), help=f"of {', '.join(CONDITIONS)}")
    ap.add_argument("--tag", default="", help="suffix of the run names (another budget: another tag)")
    ap.add_argument("--paired-runs", type=int, default=20, help="seeded Herlev k-NN splits")
    ap.add_argument("--split-seeds", default="0", help="seeds of the 4-fold field splits (each ~2-4 min per bag "
                    "kind and backbone on 2 loaded cores)")
    ap.add_argument("--no-train", action="store_true", help="evaluate only the runs already finished")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.split_seeds = [int(s) for s in args.split_seeds.split(",")]
    conditions = [c for c in args.conditions.split(",") if c]
    if bad := set(conditions) - set(CONDITIONS):
        ap.error(f"unknown conditions {sorted(bad)}; choose of {', '.join(CONDITIONS)}")

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    info = prepare(args.workdir)
    results: dict[str, list[dict]] = {"random": [evaluation(args.workdir, "random", info, None, args)],
                                      "pixels": [evaluation(args.workdir, "pixels", info, None, args)]}
    for seed in (int(s) for s in args.seeds.split(",")):
        for cond in conditions:
            run = args.workdir / "runs" / f"{cond}_s{seed}{args.tag}"
            if not args.no_train:
                run = pretrain(args.workdir, cond, seed, args.epochs, args.tag, info)
            if (run / "done.json").exists():
                results.setdefault(cond, []).append(evaluation(args.workdir, run.name, info, run, args))
    text, summary = summarise(results)
    print(f"\n{text}\n\n{time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "info": info,
                                         "results": results, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
