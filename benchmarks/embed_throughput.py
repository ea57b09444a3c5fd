"""Figure 2: `embed` throughput vs the bare backbone forward pass, on the real Herlev images.

`embed` = the real `cytoretrieve.jobs.embed.embed` job into a fresh LanceDB table (listing, decoding, preprocessing,
thumbnails, inference, commits, `finish`). Bare = `prepare` + `forward` from cytoretrieve.jobs.embed on the same
images already preprocessed into tensors: same backbone, batch size, device and image count. Both run in one
process. The machine is shared and noisy, so the bare forward pass is measured right before and right after every
embed job, and each job's ratio = its img/s / the mean of those two bare img/s; the headline is the median ratio
over rounds, per worker count. Target: >= 0.9. For workers=0, where all the work is in this process, the CPU-time
ratio (bare CPU s per image / embed CPU s per image) is printed too: it moves far less with other load.

    .venv/bin/python benchmarks/embed_throughput.py            # resnet18 (random weights), 224 px, batch 64
    .venv/bin/python benchmarks/embed_throughput.py --quick    # 1 round, workers 0 and 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import _common


def bare_forward(model: Any, tensors: Any, batch_size: int, device: str) -> tuple[float, float]:
    """(wall, CPU) seconds of `forward` over every batch of the pre-loaded tensors."""
    from cytoretrieve.models.inference import forward

    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(tensors), batch_size):
        forward(model, tensors[i : i + batch_size], device)
    return time.perf_counter() - start, time.process_time() - cpu


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.models.inference import forward, prepare
    from cytoretrieve.runtime import default_workers, resolve_device
    from cytoretrieve.sources.cells import open_dataset
    from cytoretrieve.store.tables import Store

    device = resolve_device(args.device)
    backbone = load_backbone(args.arch, "random", image_size=args.image_size, device=device)
    records = open_dataset(args.source).records
    n = len(records)
    pp = backbone.preprocessing
    print(f"{n} images from {args.source}; {backbone.arch} (random weights) at {pp.size} px {pp.resize}, "
          f"batch {args.batch_size}, device {device}, torch threads {torch.get_num_threads()} "
          f"(interop {torch.get_num_interop_threads()}), default workers {default_workers(device)}")

    tensors = []
    for r in records:
        with Image.open(r.path) as im:
            im.load()
            tensors.append(pp(im))
    batch = torch.stack(tensors)
    model = prepare(backbone, device)
    forward(model, batch[: args.batch_size], device)  # warm-up: allocator, oneDNN primitives

    bare_n = min(n, args.bare_images or n)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cytoretrieve-bench-") as tmp:
        store = Store(Path(tmp) / "store")
        wall, cpu = bare_forward(model, batch[:bare_n], args.batch_size, device)
        before, before_cpu = bare_n / wall, cpu / bare_n
        for r in range(args.rounds):
            row: dict[str, Any] = {"round": r}
            for w in args.workers:
                start, cpu = time.perf_counter(), time.process_time()
                report = embed(args.source, backbone, store, table=f"bench_r{r}_w{w}", batch_size=args.batch_size,
                               workers=w, device=device)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                assert report.added == n and not report.failed, report
                wall, bare_cpu = bare_forward(model, batch[:bare_n], args.batch_size, device)
                after, after_cpu = bare_n / wall, bare_cpu / bare_n
                bare = (before + after) / 2  # the forward pass measured right before and right after this job
                row[f"bare_w{w}_img_s"] = bare
                row[f"embed_w{w}_img_s"] = n / seconds
                row[f"ratio_w{w}"] = n / seconds / bare
                cpu_note = ""
                if w == 0:  # all the work is in this process: CPU seconds per image, robust to other load
                    row["cpu_ratio_w0"] = (before_cpu + after_cpu) / 2 / (cpu / n)
                    cpu_note = f" | CPU-time ratio {row['cpu_ratio_w0']:.3f}"
                print(f"round {r}: embed workers={w} {n / seconds:6.2f} img/s ({seconds:5.1f} s) | bare forward "
                      f"before {before:6.2f}, after {after:6.2f} img/s | ratio {n / seconds / bare:.3f}{cpu_note}",
                      flush=True)
                before, before_cpu = after, after_cpu
            rounds.append(row)

    summary: dict[str, Any] = {}
    for w in args.workers:
        summary[f"bare_w{w}_img_s_median"] = _common.median([x[f"bare_w{w}_img_s"] for x in rounds])
        summary[f"embed_w{w}_img_s_median"] = _common.median([x[f"embed_w{w}_img_s"] for x in rounds])
        summary[f"ratio_w{w}_median"] = _common.median([x[f"ratio_w{w}"] for x in rounds])
    if 0 in args.workers:
        summary["cpu_ratio_w0_median"] = _common.median([x["cpu_ratio_w0"] for x in rounds])
    return {
        "figure": "embed throughput vs bare forward",
        "images": n,
        "arch": backbone.arch,
        "weights": "random",
        "image_size": pp.size,
        "batch_size": args.batch_size,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "default_workers": default_workers(device),
        "bare_images": bare_n,
        "rounds": rounds,
        "summary": summary,
        "target": 0.9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(_common.HERLEV), help="dataset folder (read only)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's (224)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts to try")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare-images", type=int, default=None,
                        help="images per bare-forward measurement, taken before and after every embed job (default all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1 round, workers 0 and 1, bare over 256 images")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    args.workers = [int(w) for w in str(args.workers).split(",")]
    if args.quick:
        args.rounds, args.workers, args.bare_images = 1, [0, 1], args.bare_images or 256
    info = _common.machine()
    _common.print_machine(info)
    result = run(args)
    print("\nsummary (median over rounds):")
    s = result["summary"]
    for w in args.workers:
        ratio = s[f"ratio_w{w}_median"]
        verdict = "meets" if ratio >= 0.9 else "below"
        print(f"  embed, workers={w}: {s[f'embed_w{w}_img_s_median']:6.2f} img/s vs bare {s[f'bare_w{w}_img_s_median']:6.2f}"
              f" img/s; ratio {ratio:.3f} ({verdict} target 0.9)")
    if "cpu_ratio_w0_median" in s:
        print(f"  workers=0 in CPU seconds per image (bare / embed): {s['cpu_ratio_w0_median']:.3f}")
    info["loadavg_end"] = _common.print_load("at the end")
    _common.write_json(args.json, {"machine": info, **result})


if __name__ == "__main__":  # guard needed: DataLoader workers start through forkserver, which re-imports this file
    main()
