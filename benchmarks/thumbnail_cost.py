"""What the stored thumbnail's size costs: store bytes per row and `embed` throughput at each thumbnail side.

For each side (default 96, the old size, and the current `THUMBNAIL_SIZE`), the same Herlev cells are embedded by
the embedding job into a fresh store (seeded random resnet18 at its 224 px input, no DataLoader workers, so the
thumbnail is made in this process), rounds interleaved so that machine drift hits every side alike. Reported per
side: the median job img/s (wall clock) and img per CPU-second of this process (steadier on a shared machine), the
CPU time of `Preprocessing.inputs` alone per image (framing, model tensor and thumbnail: what the side changes), the
mean thumbnail JPEG bytes, and the table's bytes per row on disk.

    .venv/bin/python benchmarks/thumbnail_cost.py [--images 210] [--sizes 96,224] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import HERLEV, machine, print_load, print_machine, write_json
from PIL import Image


def _subset(root: Path, dest: Path, n: int) -> Path:
    """`dest/<class>/<cell>` links to about `n` Herlev cells, the first of each class in turn."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    per_class = -(-n // len(folders))
    for folder in folders:
        (dest / folder.name).mkdir(parents=True)
        for cell in sorted(folder.iterdir())[:per_class]:
            (dest / folder.name / cell.name).symlink_to(cell)
    return dest


def _inputs_ms(images: list, preprocessing) -> float:  # noqa: ANN001 - PIL images, a Preprocessing
    """CPU ms per image of `Preprocessing.inputs` (model tensor + thumbnail at the current THUMBNAIL_SIZE)."""
    cpu = time.process_time()
    for im in images:
        preprocessing.inputs(im)
    return (time.process_time() - cpu) * 1000 / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=HERLEV)
    parser.add_argument("--images", type=int, default=210)
    parser.add_argument("--sizes", default=None, help="thumbnail sides, comma-separated (default 96 and the current)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    import cytoretrieve.models.preprocess as preprocess
    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.store.tables import Store

    info = machine()
    print_machine(info)
    start_load = print_load("at start")
    torch.manual_seed(0)
    current = preprocess.THUMBNAIL_SIZE
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sorted({96, current})
    backbone = load_backbone("resnet18", "random")
    results: dict[int, dict[str, list[float]]] = {
        s: {"img_s": [], "img_cpu_s": [], "inputs_ms": [], "thumb_bytes": [], "row_bytes": []} for s in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        data = _subset(args.source, Path(tmp) / "cells" / "herlev", args.images)
        images = []
        for path in sorted(data.rglob("*.*")):
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        embed(data, backbone, Store(Path(tmp) / "warm"), workers=0, batch_size=32)  # first-use costs, untimed
        for r in range(args.rounds):
            for size in sizes if r % 2 == 0 else sizes[::-1]:
                preprocess.THUMBNAIL_SIZE = size
                store = Store(Path(tmp) / f"s{size}_{r}")
                cpu = time.process_time()
                report = embed(data, backbone, store, workers=0, batch_size=32)
                cpu = time.process_time() - cpu
                results[size]["img_cpu_s"].append(report.added / cpu)
                results[size]["inputs_ms"].append(_inputs_ms(images, backbone.preprocessing))
                table = store.open(report.table)
                thumbs = table.read(["thumbnail"]).column("thumbnail").to_pylist()
                stats = table.tbl.stats()
                results[size]["img_s"].append(report.added / report.seconds)
                results[size]["thumb_bytes"].append(statistics.fmean(len(t) for t in thumbs))
                results[size]["row_bytes"].append(stats["total_bytes"] / stats["num_rows"])
    preprocess.THUMBNAIL_SIZE = current
    summary = {s: {"img_s_median": statistics.median(v["img_s"]), "img_s": v["img_s"],
                   "img_cpu_s_median": statistics.median(v["img_cpu_s"]), "img_cpu_s": v["img_cpu_s"],
                   "inputs_ms_median": statistics.median(v["inputs_ms"]), "inputs_ms": v["inputs_ms"],
                   "thumbnail_bytes": statistics.fmean(v["thumb_bytes"]),
                   "table_bytes_per_row": statistics.fmean(v["row_bytes"])} for s, v in results.items()}
    print(f"{args.images} Herlev cells, resnet18 (random) at 224 px, workers 0, {args.rounds} rounds")
    print(f"{'side':>5} {'img/s':>7} {'img/CPU-s':>10} {'inputs() CPU ms':>16} {'thumbnail B':>12} {'table B/row':>12}")
    for s, v in summary.items():
        print(f"{s:>5} {v['img_s_median']:>7.1f} {v['img_cpu_s_median']:>10.1f} {v['inputs_ms_median']:>16.2f} "
              f"{v['thumbnail_bytes']:>12.0f} {v['table_bytes_per_row']:>12.0f}")
    end_load = print_load("at end")
    write_json(args.json, {"machine": info, "load": [start_load, end_load], "images": args.images, "results": summary})


if __name__ == "__main__":
    main()
