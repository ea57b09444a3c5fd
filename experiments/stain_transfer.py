"""Does stain normalisation at embed time help cross-dataset transfer? Herlev -> CRIC crops and CRIC -> Herlev.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python experiments/stain_transfer.py [--stains none macenko reinhard]
        [--seeds 3] [--arch resnet18 --image-size 64] [--weights random|FILE] [--json out.json]
    .venv/bin/python experiments/stain_transfer.py --fit-default    # print the shipped targets again

1. Per seed s and stain: the backbone is `--arch` at a seeded random init (seed s; s = 0 is `--weights random`),
   letterbox at `--image-size`; `cytoretrieve.embed` embeds the 917 Herlev cells (../shared/data/herlev_derived_jpg,
   binary by the Herlev label map: normal_* negative, dysplasia and CIS positive) and the 2,121 CRIC crops
   (../shared/data/cric_crops_100px, binary from their Bethesda folders: "Negative for intraepithelial lesion" 0,
   ASC-US, LSIL, ASC-H, HSIL, SCC 1; a JSON label map written to a scratch folder) with `stain` = that
   normaliser onto its shipped target, into a scratch store: the same job and preprocessing `embed --stain` runs.
2. `cytoretrieve.transfer` both ways (k chosen by 5-fold weighted F1 on the support, k 1-50, majority vote, CV
   seed s): balanced accuracy, sensitivity, specificity on the whole target.
3. Mean +- std over seeds per direction and stain, and each normaliser minus none paired by seed (mean +- std).
   The seeds vary the backbone's init (and the CV folds that choose k), so the spread is how much the figure
   depends on the particular random features (with `--weights FILE`, one model: the seeds vary the CV folds
   only). Normalisation would be on by default only if it helped both directions by more than that spread.

CRIC caveat (its SOURCE.md): the crops' labels are unreliable (45% hold no nucleus), so the transfer figures
measure label agreement with noisy targets; stains are compared on the same noisy targets.
`--fit-default` fits each normaliser on the central 140 px of two Herlev cells per class (the first two files of
each class folder, sorted; all resized to 200 px) placed side by side: the numbers in `models.stain.DEFAULT_TARGETS`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HERLEV = DATA / "herlev_derived_jpg"
CRIC = DATA / "cric_crops_100px"
CRIC_CLASSES = ["Negative for intraepithelial lesion", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC"]
METRICS = ("balanced_accuracy", "sensitivity", "specificity")


def cric_label_map(folder: Path) -> Path:
    path = folder / "cric_binary.json"
    binary = {c: 0 if c.startswith("Negative") else 1 for c in CRIC_CLASSES}
    path.write_text(json.dumps({"classes": CRIC_CLASSES, "binary": binary}))
    return path


def fit_default() -> dict[str, list[float]]:
    """Each normaliser fitted on the Herlev mosaic described in the module docstring."""
    from PIL import Image

    from cytoretrieve.models.stain import NORMALISERS

    crops = []
    for folder in sorted(p for p in HERLEV.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.jpg"))[:2]:
            with Image.open(path) as im:
                crops.append(np.asarray(im.convert("RGB").resize((200, 200)))[30:170, 30:170])
    mosaic = np.concatenate(crops, axis=1)
    return {name: [round(v, 4) for v in cls().fit(mosaic).target] for name, cls in NORMALISERS.items()}


def seeded_backbone(arch: str, image_size: int, seed: int, weights: str = "random"):  # noqa: ANN201 - a Backbone
    """`arch` at a random init drawn with `seed`, with the package's preprocessing and a fingerprint of its own;
    with a weights file, that model whatever the seed (the seed then varies only the CV folds)."""
    from cytoretrieve.models.backbones import create_model, fingerprint, load_backbone

    base = load_backbone(arch, weights, image_size=image_size)
    if seed == 0 or weights != "random":
        return base
    model = create_model(base.arch, seed=seed).eval()
    return replace(base, model=model, fingerprint=fingerprint(model, base.arch, base.preprocessing))


def run(args: argparse.Namespace) -> list[dict]:
    import cytoretrieve

    runs = []
    with tempfile.TemporaryDirectory(prefix="stain-transfer-") as scratch:
        label_map = cric_label_map(Path(scratch))
        store = cytoretrieve.open_store(Path(scratch) / "store")
        for seed in range(args.seeds):
            backbone = seeded_backbone(args.arch, args.image_size, seed, args.weights)
            for stain in args.stains:
                t0 = time.perf_counter()
                tables = {}
                for name, source, lm in (("herlev", HERLEV, None), ("cric", CRIC, label_map)):
                    report = cytoretrieve.embed(source, backbone, store, table=f"{name}_{stain}_s{seed}",
                                                label_map=lm, stain=stain, workers=0, device="cpu")
                    if report.failed:
                        print(f"  {name} {stain}: {len(report.failed)} images skipped, e.g. {report.failed[0]}")
                    tables[name] = store.open(report.table)
                embed_s = time.perf_counter() - t0
                for support, target in (("herlev", "cric"), ("cric", "herlev")):
                    r = cytoretrieve.transfer([tables[support]], tables[target], seed=seed)
                    row = {"seed": seed, "stain": stain, "direction": f"{support}->{target}", "k": r.k,
                           **{m: float(getattr(r, m)) for m in METRICS}, "n_target": r.n_target,
                           "embed_seconds": embed_s}
                    runs.append(row)
                    print(f"seed {seed} {stain:8s} {support:6s} -> {target:6s}: k {r.k:2d}, balanced accuracy "
                          f"{row['balanced_accuracy']:.3f}, sensitivity {row['sensitivity']:.3f}, specificity "
                          f"{row['specificity']:.3f} (embedding both {embed_s:.0f} s)", flush=True)
    return runs


def summarise(runs: list[dict], stains: list[str]) -> list[dict]:
    out = []
    for direction in sorted({r["direction"] for r in runs}, reverse=True):
        base = {r["seed"]: r for r in runs if r["direction"] == direction and r["stain"] == "none"}
        for stain in stains:
            rs = [r for r in runs if r["direction"] == direction and r["stain"] == stain]
            row = {"direction": direction, "stain": stain, "seeds": len(rs)}
            for m in METRICS:
                v = np.array([r[m] for r in rs])
                row[m] = [float(v.mean()), float(v.std())]
            if stain != "none" and base:
                d = np.array([r["balanced_accuracy"] - base[r["seed"]]["balanced_accuracy"] for r in rs])
                row["minus_none"] = [float(d.mean()), float(d.std())]
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stains", nargs="+", default=["none", "macenko", "reinhard"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--weights", default="random",
                        help="random (seeded init per seed) or a weights file, e.g. an exported DINO teacher.")
    parser.add_argument("--fit-default", action="store_true", help="Print the shipped targets and stop.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.fit_default:
        print(json.dumps(fit_default(), indent=1))
        return
    started = time.perf_counter()
    runs = run(args)
    summary = summarise(runs, args.stains)
    varied = "init + CV folds" if args.weights == "random" else "CV folds"
    print(f"\n{args.arch} {args.weights} at {args.image_size} px, {args.seeds} seeds ({varied}): mean +- std")
    print("direction | stain | balanced accuracy | sensitivity | specificity | minus none (balanced accuracy)")
    for s in summary:
        minus = f"{s['minus_none'][0]:+.3f} +- {s['minus_none'][1]:.3f}" if "minus_none" in s else "-"
        print(f"{s['direction']} | {s['stain']} | " + " | ".join(f"{s[m][0]:.3f} +- {s[m][1]:.3f}" for m in METRICS)
              + f" | {minus}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                         "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
