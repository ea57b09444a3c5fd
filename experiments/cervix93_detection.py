"""Nucleus detection on the real Cervix93 fields: the classic detector and a point-trained one, scored on the test set.

    .venv/bin/python experiments/cervix93_detection.py [--data DIR] [--mpp 0.25] [--no-tune] [--epochs N]
                                                       [--seed S] [--out model.pt] [--json figures.json]
                                                       [--holdout 15] [--[no-]tta] [--work-mpp M] [--sigma-um S]
                                                       [--widths 16,32,48] [--contrast-um C] [--loss mse|bce]
                                                       [--ensemble N] [--members DIR] [--folds K]
                                                       [--classic-only | --no-classic]

Cervix93 (Phoulady & Mouton, arXiv:1811.09651): 93 grey 1280 x 960 EDF fields of conventional Pap smears, one
point inside each nucleus, set 0 = 69 training fields, set 1 = 24 test fields. The test fields are only scored,
never used to choose anything.

1. **scale**: the pixel size is not published; each training nucleus's diameter in px is measured (the radius
   where the mean darkness around its point falls fastest), and the match radius is the median radius.
   `--mpp` (default 0.25 um/px, a 40x objective) turns px into um for the detectors' physical settings.
2. **classic**: candidates on the training fields once; unless `--no-tune`, the rule thresholds (area, solidity,
   eccentricity, contrast, top-hat, darkness) by coordinate ascent of training F1 from the defaults.
3. **point-trained**: an ensemble of `--ensemble` N networks (seeds `--seed` .. `--seed` + N - 1, their heat maps
   averaged; N = 1 is one network). With `--holdout H` (default 15), H training fields (spread over the grades)
   are held out: the N members trained on the other training fields pick the detection threshold, the peak
   separation and whether to average flips (`--tta`, unless given) by the ensemble's F1 on the held-out fields;
   the held-out F1 of each single member and of the ensembles of its first 1..N members are reported too (the
   seed-to-seed spread, and what averaging buys). Then N members on all training fields (`--epochs` passes of
   random crops each), joined with those choices into ONE model file, `--out` (with `--holdout 0`: the threshold
   by training F1). The network settings' defaults (`CHOSEN`) were themselves chosen on the same held-out fields.
   With `--folds K` > 1 the choice is made on all training fields instead, cross-fitted: the held-out fields and
   K - 1 more groups of the rest, each group's maps made by members trained on the training fields outside it
   (K - 1 more trainings per member), so a threshold is chosen on ~4.5x the points.
   `--members DIR` keeps each trained member there (one file per phase and seed) and reuses a file whose training
   data and settings match: training is deterministic per seed, so a rerun gives the same figures faster.
4. Both scored on the test fields: each point matched to at most one detection within the radius (Hungarian);
   recall, precision, F1, detected nuclei per CPU-second (one thread), and the training CPU time. With an
   ensemble and a holdout, each final member alone is scored too (its threshold and separation chosen on the
   held-out fields from its held-out twin, without flips unless `--tta`): the test spread of single networks
   beside the ensemble.

One torch thread, one process. Prints a table; `--json` keeps every figure and setting.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi

from cytoretrieve.sources.slides.detectors import darkness, get_detector
from cytoretrieve.sources.slides.detectors.classic import (
    ClassicDetector,
    ClassicSettings,
    _check_mpp,
    candidates,
    select,
    to_working,
)
from cytoretrieve.sources.slides.detectors.evaluate import Counts, count
from cytoretrieve.sources.slides.detectors.learned import (
    DETECTION_SETTINGS,
    PointDetector,
    PointSettings,
    choose_threshold,
    combine,
    load,
    train_point_detector,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cervix93"

# Rule thresholds searched on the training fields (the classic detector's step 5).
RULE_GRID: dict[str, list[float]] = {
    "min_area_um2": [2, 4, 6, 8, 10, 12, 15],
    "max_area_um2": [60, 80, 100, 130, 160, 200, 300],
    "min_solidity": [0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94],
    "max_eccentricity": [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 1.0],
    "min_contrast_od": [0.0, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1],
    "min_contrast_round_od": [0.0, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07],
    "round_solidity": [0.9, 0.92, 0.93, 0.94, 0.95, 0.96],
    "round_eccentricity": [0.6, 0.7, 0.75, 0.8, 0.85, 0.9],
    "min_tophat_od": [0.05, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2],
    "max_tophat_od": [0.5, 0.6, 0.7, 0.8, 1.0, 1.5, 9.0],
    "max_darkness_od": [0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 9.0],
}


@dataclass
class Field:
    frame: str
    image: np.ndarray
    points: np.ndarray  # (n, 2) x y, px
    grade: str


def load_cervix93(root: Path, set_id: int) -> list[Field]:
    """The fields of one set (0 train, 1 test) with their points."""
    with open(root / "labels.csv", newline="") as fh:
        labels = {r["frame"].strip(): r for r in csv.DictReader(fh)}
    points: dict[str, list[tuple[float, float]]] = {}
    with open(root / "points.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            points.setdefault(r["frame"].strip(), []).append((float(r["x"]), float(r["y"])))
    frames = sorted(f for f, r in labels.items() if int(r["set"]) == set_id)
    return [
        Field(f, np.asarray(Image.open(root / "EDF" / f"{f}.png")), np.array(points.get(f, [])).reshape(-1, 2),
              labels[f]["label"].strip())
        for f in frames
    ]


def nucleus_diameters_px(fields: list[Field], max_radius: int = 40) -> np.ndarray:
    """Per annotated nucleus: twice the radius (px) where the mean darkness around its point falls fastest."""
    yy, xx = np.mgrid[-max_radius : max_radius + 1, -max_radius : max_radius + 1]
    rings = np.round(np.hypot(yy, xx)).astype(int)
    out = []
    for f in fields:
        od = np.pad(ndi.gaussian_filter(darkness(f.image), 1.0), max_radius, mode="reflect")
        for x, y in np.round(f.points).astype(int) + max_radius:
            patch = od[y - max_radius : y + max_radius + 1, x - max_radius : x + max_radius + 1]
            profile = ndi.mean(patch, rings, index=np.arange(max_radius + 1))
            out.append(2 * (int(np.argmin(np.diff(profile)[2 : max_radius - 5])) + 2.5))
    return np.array(out)


def _table_counts(tables: list[dict[str, np.ndarray]], scales: list[float], fields: list[Field],
                  settings: ClassicSettings, radius_px: float) -> Counts:
    total = Counts()
    for table, scale, f in zip(tables, scales, fields):
        keep = select(table, settings)
        xy = (np.c_[table["x"][keep], table["y"][keep]] + 0.5) / scale - 0.5
        total = total + count(xy, f.points, radius_px)
    return total


def tune_classic(fields: list[Field], mpp: float, radius_px: float, rounds: int = 3) -> tuple[ClassicSettings, Counts, float]:
    """Rule thresholds by coordinate ascent of training F1 over `RULE_GRID`, from the defaults; (settings, training
    counts, CPU s of the candidate pass)."""
    started = time.process_time()
    cands = [candidates(f.image, mpp) for f in fields]
    cand_cpu = time.process_time() - started
    tables, scales = [c.table for c in cands], [c.scale for c in cands]
    best = ClassicSettings()
    best_counts = _table_counts(tables, scales, fields, best, radius_px)
    for _ in range(rounds):
        changed = False
        for name, values in RULE_GRID.items():
            for v in values:
                trial = replace(best, **{name: float(v)})
                if trial.min_area_um2 > trial.max_area_um2:
                    continue
                c = _table_counts(tables, scales, fields, trial, radius_px)
                if c.f1 > best_counts.f1 + 1e-9:
                    best, best_counts, changed = trial, c, True
        if not changed:
            break
    return best, best_counts, cand_cpu


def score(detector: Any, fields: list[Field], mpp: float, radius_px: float) -> dict[str, Any]:
    """Counts, precision / recall / F1 and speed of `detector` on `fields`."""
    total, found = Counts(), 0
    cpu = 0.0
    per_grade: dict[str, Counts] = {}
    for f in fields:
        t0 = time.process_time()
        nuclei = detector(f.image, mpp)
        cpu += time.process_time() - t0
        c = count(nuclei.xy, f.points, radius_px)
        total = total + c
        per_grade[f.grade] = per_grade.get(f.grade, Counts()) + c
        found += len(nuclei)
    return {
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in total.to_dict().items()},
        "cpu_s": round(cpu, 2),
        "nuclei_per_cpu_s": round(found / cpu, 1) if cpu else None,
        "fields_per_cpu_s": round(len(fields) / cpu, 2) if cpu else None,
        "per_grade": {g: {k: round(v, 4) if isinstance(v, float) else v for k, v in c.to_dict().items()}
                      for g, c in sorted(per_grade.items())},
    }


def steps_for(epochs: float, fields: list[Field], mpp: float, settings: PointSettings) -> int:
    """Training steps for `epochs` passes: one pass draws as many crop pixels as the training fields hold."""
    scale = min(1.0, mpp / settings.work_mpp)
    pixels = sum(f.image.shape[0] * f.image.shape[1] for f in fields) * scale**2
    return max(1, int(math.ceil(epochs * pixels / (settings.patch_px**2 * settings.batch))))


def split_holdout(fields: list[Field], n: int) -> tuple[list[Field], list[Field]]:
    """(fit, held-out): `n` training fields held out, spread evenly over each grade's frames (a fixed choice)."""
    if n <= 0:
        return list(fields), []
    total = len(fields)
    held: set[str] = set()
    for g in sorted({f.grade for f in fields}):
        frames = sorted(f.frame for f in fields if f.grade == g)
        k = int(round(n * len(frames) / total))
        held.update(frames[int(i)] for i in np.floor((np.arange(k) + 0.5) * len(frames) / max(k, 1)))
    return [f for f in fields if f.frame not in held], [f for f in fields if f.frame in held]


def split_folds(fields: list[Field], holdout: int, folds: int) -> list[list[Field]]:
    """`folds` groups of training fields that cover them all: the `split_holdout` held-out fields first, then the
    rest in `folds` - 1 groups, each spread over the grades the same way (a fixed choice)."""
    rest, held = split_holdout(fields, holdout)
    groups = [held]
    for k in range(folds - 1, 0, -1):
        rest, group = split_holdout(rest, int(round(len(rest) / k)))
        groups.append(group)
    return groups


def train_members(fields: list[Field], params: PointSettings, mpp: float, cache: Path | None, tag: str) -> list[PointDetector]:
    """One single-network detector per seed of `params` (`params.seeds`), trained on `fields` (no threshold
    tuning); with `cache`, a member file `<tag>_seed<S>.pt` there is reused when its training data and settings
    match, else the trained member is written there."""
    names = [f.frame for f in fields]
    members = []
    for seed in params.seeds:
        single = replace(params, seed=seed, ensemble=1)
        path = cache / f"{tag}_seed{seed}.pt" if cache else None
        if path is not None and path.is_file():
            found = load(path)
            want = {k: v for k, v in single.to_dict().items() if k not in DETECTION_SETTINGS}
            have = {k: v for k, v in found.params.to_dict().items() if k not in DETECTION_SETTINGS}
            if have == want and found.record.get("names") == names:
                print(f"  member {tag} seed {seed}: reused {path} ({found.record.get('train_cpu_s')} CPU s when trained)",
                      flush=True)
                members.append(found)
                continue
            print(f"  member {tag} seed {seed}: {path} was trained otherwise; training again", flush=True)
        found = train_point_detector([(f.image, f.points, mpp) for f in fields], names=names, settings=single,
                                     tune_threshold=False)
        print(f"  member {tag} seed {seed}: trained, {found.record['train_cpu_s']} CPU s", flush=True)
        if path is not None:
            found.save(path)
        members.append(found)
    return members


def holdout_grid(members: list[PointDetector], fields: list[Field], mpp: float, radius_px: float,
                 thresholds: list[float], separations: list[float], ttas: list[bool]
                 ) -> tuple[dict[int, dict[tuple[bool, float, float], Counts]], dict[int, dict[tuple[bool, float, float], Counts]]]:
    """Counts on `fields` for each (tta, min separation um, threshold): `(ensembles, singles)`, `ensembles[k]` for
    the mean map of the first k members, `singles[i]` for member i alone; each member's map made once per tta."""
    ens: dict[int, dict[tuple[bool, float, float], Counts]] = {k: {} for k in range(1, len(members) + 1)}
    singles: dict[int, dict[tuple[bool, float, float], Counts]] = {i: {} for i in range(len(members))}
    params = members[0].params

    def add(table: dict[tuple[bool, float, float], Counts], heat: np.ndarray, tta: bool, work_px: float,
            truth: np.ndarray, radius: float) -> None:
        for sep in separations:
            d = PointDetector(members[0].net, replace(params, ensemble=1, min_separation_um=sep))
            for t in thresholds:
                rc = d.peaks(heat, work_px, t)
                key = (tta, sep, t)
                table[key] = table.get(key, Counts()) + count(rc[:, ::-1].astype(float), truth, radius)

    for f in fields:
        od, scale = to_working(darkness(f.image), _check_mpp(mpp), params.work_mpp)
        work_px = mpp / scale
        truth = (f.points + 0.5) * scale - 0.5
        for tta in ttas:
            maps = [m.heat_map(od, work_px, tta=tta) for m in members]
            for i, heat in enumerate(maps):
                add(singles[i], heat, tta, work_px, truth, radius_px * scale)
            total = np.zeros_like(maps[0])
            for k, heat in enumerate(maps, start=1):
                total += heat
                if k > 1:
                    add(ens[k], total / k, tta, work_px, truth, radius_px * scale)
    ens[1] = singles[0]
    return ens, singles


def best_key(grid: dict[tuple[bool, float, float], Counts]) -> tuple[bool, float, float]:
    """The best (tta, separation, threshold) by F1; ties to no flips, separation 3 um, threshold 0.5."""
    return max(grid, key=lambda k: (round(grid[k].f1, 6), -k[0], -abs(k[1] - 3.0), -abs(k[2] - 0.5)))


# Settings chosen on held-out training fields (see `--holdout`); the script's defaults.
CHOSEN: dict[str, Any] = {"epochs": 8.0, "work_mpp": 0.75, "sigma_um": 2.5, "widths": (16, 32, 48), "contrast_um": 0.0,
                          "loss": "mse", "ensemble": 3}
THRESHOLDS = [round(float(t), 2) for t in np.arange(0.2, 0.96, 0.05)]
SEPARATIONS = [2.0, 2.5, 3.0, 3.5, 4.0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--mpp", type=float, default=0.25, help="assumed um per pixel of the fields")
    parser.add_argument("--no-tune", action="store_true", help="classic detector with its default settings")
    parser.add_argument("--epochs", type=float, default=CHOSEN["epochs"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-mpp", type=float, default=CHOSEN["work_mpp"], help="detector working um/px")
    parser.add_argument("--sigma-um", type=float, default=CHOSEN["sigma_um"], help="heat-map Gaussian sigma")
    parser.add_argument("--widths", type=lambda v: tuple(int(w) for w in v.split(",")), default=CHOSEN["widths"],
                        help="U-Net channels per level, comma-separated")
    parser.add_argument("--contrast-um", type=float, default=CHOSEN["contrast_um"],
                        help="second input channel: local contrast at this blur (0: none)")
    parser.add_argument("--loss", choices=["mse", "bce"], default=CHOSEN["loss"])
    parser.add_argument("--holdout", type=int, default=15,
                        help="training fields held out to choose threshold, peak separation and flips (0: none, "
                             "threshold by training F1)")
    parser.add_argument("--folds", type=int, default=1,
                        help="with K > 1, choose the detection settings on all training fields, cross-fitted: the "
                             "held-out fields and K - 1 more groups, each scored by members trained without it")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the eight flips / turns (default: chosen on the held-out fields, else off)")
    parser.add_argument("--ensemble", type=int, default=CHOSEN["ensemble"],
                        help="networks averaged in the one model (seeds --seed, --seed + 1, ...)")
    parser.add_argument("--members", type=Path, default=None,
                        help="folder keeping each trained member; a matching member file there is reused")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cervix93_points.pt"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--classic-only", action="store_true", help="stop after the classic detector (no training)")
    parser.add_argument("--no-classic", action="store_true", help="only the point-trained detector")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    wall = time.time()

    train, test = load_cervix93(args.data, 0), load_cervix93(args.data, 1)
    diam = nucleus_diameters_px(train)
    radius_px = float(np.median(diam) / 2)
    grades = np.array([f.grade for f in train for _ in range(len(f.points))])
    scale_info = {
        "assumed_mpp": args.mpp,
        "train_nucleus_diameter_px_q10_q50_q90": np.percentile(diam, [10, 50, 90]).round(1).tolist(),
        "median_diameter_px_by_grade": {g: float(np.median(diam[grades == g])) for g in "NLH" if (grades == g).any()},
        "median_diameter_um": round(float(np.median(diam)) * args.mpp, 2),
        "match_radius_px": radius_px,
    }
    print(f"train {len(train)} fields / {sum(len(f.points) for f in train)} points; "
          f"test {len(test)} / {sum(len(f.points) for f in test)}")
    print(f"nucleus diameter (train) px q10/q50/q90 {scale_info['train_nucleus_diameter_px_q10_q50_q90']}, "
          f"by grade {scale_info['median_diameter_px_by_grade']}; at {args.mpp} um/px the median is "
          f"{scale_info['median_diameter_um']} um; match radius {radius_px} px", flush=True)

    results: dict[str, Any] = {"scale": scale_info}
    if args.no_classic:
        pass
    elif args.no_tune:
        classic = ClassicDetector()
        results["classic_train"] = None
    else:
        t0 = time.process_time()
        settings, train_counts, cand_cpu = tune_classic(train, args.mpp, radius_px)
        classic = ClassicDetector(settings)
        results["classic_train"] = {**train_counts.to_dict(), "tune_cpu_s": round(time.process_time() - t0, 1)}
        print(f"classic tuned on train: F1 {train_counts.f1:.3f} (candidates {cand_cpu:.0f} CPU s)", flush=True)
    if not args.no_classic:
        results["classic_settings"] = classic.settings
        results["classic_test"] = score(classic, test, args.mpp, radius_px)
    if args.classic_only:
        r = results["classic_test"]
        print(f"classic on the {len(test)} test fields: recall {r['recall']:.3f} precision {r['precision']:.3f} "
              f"F1 {r['f1']:.3f}, {r['nuclei_per_cpu_s']:.1f} nuclei per CPU-s")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=float))
        return results

    params = PointSettings(seed=args.seed, work_mpp=args.work_mpp, sigma_um=args.sigma_um, widths=args.widths,
                           contrast_um=args.contrast_um, loss=args.loss, match_radius_um=radius_px * args.mpp,
                           ensemble=args.ensemble)
    params.validate()
    chosen: dict[str, Any] = {}
    single_chosen: list[dict[str, Any]] = []
    if args.holdout > 0:
        # Detection settings chosen on held-out training fields, by models trained on the rest; never the test.
        fit, held = split_holdout(train, args.holdout)
        steps = steps_for(args.epochs, fit, args.mpp, params)
        t0 = time.process_time()
        probes = train_members(fit, replace(params, steps=steps), args.mpp, args.members, "holdout")
        probe_cpu = sum(float(m.record.get("train_cpu_s") or 0.0) for m in probes)
        ttas = [False, True] if args.tta is None else [args.tta]
        t1 = time.process_time()
        ens, singles = holdout_grid(probes, held, args.mpp, radius_px, THRESHOLDS, SEPARATIONS, ttas)
        held_only = best_key(ens[len(probes)])
        held_only_counts = ens[len(probes)][held_only].to_dict()
        folds: list[dict[str, Any]] = []
        for g, group in enumerate(split_folds(train, args.holdout, args.folds)[1:] if args.folds > 1 else [], 1):
            # cross-fitting: every other training field scored by members trained without its group
            out = {f.frame for f in group}
            fit_g = [f for f in train if f.frame not in out]
            steps_g = steps_for(args.epochs, fit_g, args.mpp, params)
            mem_g = train_members(fit_g, replace(params, steps=steps_g), args.mpp, args.members, f"fold{g}")
            ens_g, singles_g = holdout_grid(mem_g, group, args.mpp, radius_px, THRESHOLDS, SEPARATIONS, ttas)
            for table, extra in ((ens, ens_g), (singles, singles_g)):
                for i in table:
                    table[i] = {k: table[i][k] + extra[i][k] for k in table[i]}
            probe_cpu += sum(float(m.record.get("train_cpu_s") or 0.0) for m in mem_g)
            folds.append({"fields": sorted(out), "steps": steps_g})
        key = best_key(ens[len(probes)])
        chosen = {"tta": key[0], "min_separation_um": key[1], "threshold": key[2]}
        by_tta = {str(t): max((c for k, c in ens[len(probes)].items() if k[0] == t), key=lambda c: c.f1).to_dict()
                  for t in ttas}
        per_k = {}
        for k, grid in ens.items():
            kk = best_key(grid)
            per_k[k] = {"tta": kk[0], "min_separation_um": kk[1], "threshold": kk[2], **grid[kk].to_dict()}
        per_member = []
        for i, grid in singles.items():
            no_flip = {k: c for k, c in grid.items() if not k[0]} or grid  # without flips unless forced on
            kk = best_key(no_flip)
            single_chosen.append({"tta": kk[0], "min_separation_um": kk[1], "threshold": kk[2]})
            per_member.append({"seed": probes[i].params.seed, **single_chosen[-1], **no_flip[kk].to_dict()})
        results["holdout"] = {"fit_fields": [f.frame for f in fit], "held_out_fields": [f.frame for f in held],
                              "held_out_points": int(sum(len(f.points) for f in held)), "steps": steps,
                              "members": len(probes), "train_cpu_s": round(probe_cpu, 1),
                              "grid_cpu_s": round(time.process_time() - t1, 1), "chosen": chosen,
                              "counts": ens[len(probes)][key].to_dict(), "best_by_tta": by_tta,
                              "best_by_members": per_k, "single_members": per_member,
                              "held_out_fields_only": {"chosen": dict(zip(("tta", "min_separation_um", "threshold"),
                                                                          held_only)), "counts": held_only_counts},
                              "cross_fit_groups": folds,
                              "chosen_on": f"all {len(train)} training fields, cross-fitted" if folds else
                                           f"the {len(held)} held-out fields"}
        if folds:
            print(f"cross-fitted over all {len(train)} training fields ({len(folds) + 1} groups); held-out fields "
                  f"alone would choose {results['holdout']['held_out_fields_only']['chosen']}")
        print(f"scored on {results['holdout']['chosen_on']} (held-out: {len(held)}, {results['holdout']['held_out_points']}"
              f" points; {len(probes)} member(s) on the other {len(fit)}; members {probe_cpu:.0f} CPU s; grid "
              f"{time.process_time() - t0:.0f} CPU s in all):", flush=True)
        for m in per_member:
            print(f"  member seed {m['seed']} alone (flips {m['tta']}): F1 {m['f1']:.3f} at threshold {m['threshold']}, "
                  f"separation {m['min_separation_um']}")
        for k, r in per_k.items():
            print(f"  first {k} member(s) averaged: F1 {r['f1']:.3f} (recall {r['recall']:.3f}, precision "
                  f"{r['precision']:.3f}) with flips {r['tta']}, separation {r['min_separation_um']}, "
                  f"threshold {r['threshold']}")
        print(f"  chose {chosen}", flush=True)
    steps = steps_for(args.epochs, train, args.mpp, params)
    t0, w0 = time.process_time(), time.time()
    finals = train_members(train, replace(params, steps=steps), args.mpp, args.members, "final")
    train_cpu = sum(float(m.record.get("train_cpu_s") or 0.0) for m in finals)
    train_wall = time.time() - w0
    learned = combine(finals, **{"tta": bool(args.tta), **chosen})
    if not chosen:  # no held-out fields: the threshold with the best training F1
        thr, counts = choose_threshold(learned, [(f.image, f.points, args.mpp) for f in train])
        learned = PointDetector(learned.nets, replace(learned.params, threshold=thr),
                                {**learned.record, "threshold_train_counts": counts.to_dict()})
    learned.save(args.out)
    reloaded = get_detector(args.out)
    results["points_training"] = {"epochs": args.epochs, "steps": steps, "members": len(finals),
                                  "cpu_s": round(train_cpu, 1), "wall_s_this_run": round(train_wall, 1),
                                  "model_file": str(args.out), "model_bytes": args.out.stat().st_size,
                                  "record": reloaded.record}
    results["points_settings"] = reloaded.settings
    results["points_test"] = score(reloaded, test, args.mpp, radius_px)
    if single_chosen and len(finals) > 1:
        results["points_test_single_members"] = [
            {"seed": m.params.seed, **single_chosen[i],
             **score(PointDetector(m.net, replace(m.params, **single_chosen[i])), test, args.mpp, radius_px)}
            for i, m in enumerate(finals)]
    results["wall_s"] = round(time.time() - wall, 1)

    if "holdout" in results:
        h = results["holdout"]["counts"]
        print(f"\n{results['holdout']['chosen_on']}: recall {h['recall']:.3f} precision {h['precision']:.3f} "
              f"F1 {h['f1']:.3f} with {chosen}")
    print(f"\n{'test fields':<24}{'recall':>8}{'precision':>11}{'F1':>7}{'nuclei/CPU-s':>14}{'train CPU s':>13}")
    rows = [("classic", results["classic_test"], 0.0)] if "classic_test" in results else []
    rows += [(f"point-trained x{len(finals)}", results["points_test"], train_cpu)]
    rows += [(f"  member seed {r['seed']} alone", r, float(finals[i].record.get("train_cpu_s") or 0.0))
             for i, r in enumerate(results.get("points_test_single_members", []))]
    for label, r, train_s in rows:
        print(f"{label:<24}{r['recall']:>8.3f}{r['precision']:>11.3f}{r['f1']:>7.3f}{r['nuclei_per_cpu_s']:>14.1f}"
              f"{train_s:>13.0f}")
    print(f"(test fields: {len(test)}, points {sum(len(f.points) for f in test)}; match radius {radius_px} px; "
          f"wall {results['wall_s']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
