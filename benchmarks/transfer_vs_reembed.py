"""Transfer from stored vectors vs re-embedding the two datasets it reads (issue 4, performance).

transfer = open the Herlev (support) and CRIC (target) tables, read their vectors and binary labels, choose k by
5-fold weighted F1 on Herlev (k 1-50), predict every CRIC cell and score it: the `cytoretrieve.queries.transfer.transfer`
call that `cytoretrieve transfer` makes. re-embed = the `cytoretrieve.jobs.embed.embed` job over both image sets with the
same backbone into fresh tables (what a pipeline without a store would pay). One process, side by side; the embeds
that create the tables come first, then the transfer repeats, then a second copy of both is embedded and timed.
CRIC's binary mapping is written as a JSON label map in a temporary folder: "Negative for intraepithelial lesion"
-> 0, ASC-US, LSIL, ASC-H, HSIL, SCC -> 1. Ratio = re-embed seconds / transfer seconds.

    .venv/bin/python benchmarks/transfer_vs_reembed.py             # resnet18 (random weights), 64 px
    .venv/bin/python benchmarks/transfer_vs_reembed.py --json transfer.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

CRIC = _common.ROOT.parent / "shared" / "data" / "cric_crops_100px"
CRIC_CLASSES = ["Negative for intraepithelial lesion", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC"]


def cric_label_map(folder: Path) -> Path:
    path = folder / "cric_binary.json"
    binary = {c: 0 if c.startswith("Negative") else 1 for c in CRIC_CLASSES}
    path.write_text(json.dumps({"classes": CRIC_CLASSES, "binary": binary}))
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.queries.transfer import transfer
    from cytoretrieve.store.tables import Store

    backbone = load_backbone(args.arch, "random", image_size=args.image_size, device="cpu")
    size = backbone.preprocessing.size
    print(f"{backbone.arch} (random weights) at {size} px, batch {args.batch_size}, workers {args.workers}, cpu, "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="cytoretrieve-bench-") as tmp:
        label_map = cric_label_map(Path(tmp))
        store = Store(Path(tmp) / "store")
        jobs = [("herlev", args.herlev, None), ("cric", args.cric, label_map)]
        first = {name: embed(src, backbone, store, table=name, label_map=lm, batch_size=args.batch_size,
                             workers=args.workers, device="cpu") for name, src, lm in jobs}
        for name, rep in first.items():
            assert rep.added and not rep.failed, (name, rep)
        # warm-up: sklearn / faiss imports and first-call costs are not what the figure is about
        transfer([store.open("herlev")], store.open("cric"), k=5)
        times: list[float] = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = transfer([store.open("herlev")], store.open("cric"), vote=args.vote)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        again = {name: embed(src, backbone, store, table=f"{name}_again", label_map=lm, batch_size=args.batch_size,
                             workers=args.workers, device="cpu") for name, src, lm in jobs}
        reembed_s = time.perf_counter() - start
        for name, rep in again.items():
            assert rep.added == first[name].added, (name, rep)

    transfer_s = _common.median(times)
    ratio = reembed_s / transfer_s
    images = sum(r.added for r in again.values())
    print(f"transfer herlev -> cric ({args.vote} vote): k* = {result.k} (5-fold weighted F1 "
          f"{max(result.cv_f1_curve):.3f}), sensitivity {result.sensitivity:.3f}, specificity "
          f"{result.specificity:.3f}, balanced accuracy {result.balanced_accuracy:.3f} "
          f"({result.n_support} support / {result.n_target} target vectors)")
    print(f"transfer (open 2 tables + read vectors + choose k over 1-50 by 5-fold CV + predict + score): median "
          f"{transfer_s * 1e3:.1f} ms over {args.repeats} repeats (min {min(times) * 1e3:.1f}, "
          f"max {max(times) * 1e3:.1f})")
    print(f"re-embed {images} images ({', '.join(f'{n} {r.added}' for n, r in again.items())}): {reembed_s:.2f} s "
          f"({images / reembed_s:.1f} img/s); first embeds "
          f"{', '.join(f'{n} {r.seconds:.2f} s' for n, r in first.items())}")
    print(f"ratio re-embed / transfer = {ratio:.0f}")
    return {
        "figure": "transfer from the store vs re-embedding",
        "images": {name: r.added for name, r in again.items()},
        "arch": backbone.arch,
        "weights": "random",
        "image_size": size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "vote": args.vote,
        "transfer_seconds": times,
        "transfer_seconds_median": transfer_s,
        "reembed_seconds": reembed_s,
        "first_embed_seconds": {name: r.seconds for name, r in first.items()},
        "ratio": ratio,
        "result": result.to_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--herlev", default=str(_common.HERLEV), help="Herlev folder (read only): the support")
    parser.add_argument("--cric", default=str(CRIC), help="CRIC crops folder (read only): the target")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers; default: the package's")
    parser.add_argument("--vote", default="majority", choices=["majority", "weighted"])
    parser.add_argument("--repeats", type=int, default=5, help="transfer repeats (median reported)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    info = _common.machine()
    _common.print_machine(info)
    _common.write_json(args.json, {"machine": info, **run(args)})


if __name__ == "__main__":  # guard needed: DataLoader workers start through forkserver, which re-imports this file
    main()
