"""DINO trainer (issue 5): time per training step and the fraction of it spent waiting for data (target < 10%).

CPU (default): the tests' tiny config (resnet18 at 64 px, out_dim 256, head hidden 2048, resnet50 recipe: SGD,
2 global crops) at batch 32 on the real CRIC crops (2,121 tiles of 100 px), through the real `train()` job, with
0, 1 and 2 DataLoader workers. Step time and data wait come from the job's own log.jsonl (step_s, data_wait),
the first 2 steps of each run dropped (worker start-up, allocator warm-up). Also: the view pipeline alone
(decode + 2 global views, no model) in images/s in one process, i.e. per core.

GPU (--gpu, needs CUDA): ViT-S/16 at batch 192 and ResNet50 at batch 256, 2 global crops at 224, bf16, out_dim
65536, official recipes; (a) the model step alone on device-resident uint8 views (the ceiling), (b) the whole
job on synthetic 320 px tiles written to a temp folder, default workers. Reports images/s and data wait.

    .venv/bin/python benchmarks/train_step.py [--quick] [--json out.json]
    .venv/bin/python benchmarks/train_step.py --gpu [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

CRIC = _common.ROOT.parent / "shared" / "data" / "cric_crops_100px"


def job(data: list[str], out: Path, steps: int, **kw: Any) -> dict[str, Any]:
    """Run `train()` for `steps` steps; per-step figures from its log (first 2 steps dropped)."""
    from cytoretrieve.train.config import make_config
    from cytoretrieve.train.loop import train

    config = make_config(data, str(out), max_steps=steps, **kw)
    start = time.perf_counter()
    report = train(config)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"event"' not in line][2:]
    step_s = [r["step_s"] for r in rows]
    return {
        "steps_timed": len(rows),
        "batch": config.batch_size,
        "workers": kw.get("workers"),
        "step_s_median": statistics.median(step_s),
        "images_per_s": config.batch_size / statistics.median(step_s),
        "data_wait_mean": statistics.fmean(r["data_wait"] for r in rows),
        "data_wait_median": statistics.median(r["data_wait"] for r in rows),
        "job_wall_s": wall,
        "last_loss": report.last_loss,
    }


def views_per_second(data: str, size: int, n: int) -> float:
    """Decode + 2 global DINO views (the per-sample CPU work), one process."""
    from cytoretrieve.train.augment import DinoViews, ViewSpec
    from cytoretrieve.train.data import TrainDataset, open_sources

    ds = TrainDataset(open_sources([data]), DinoViews(ViewSpec(image_size=size)), seed=0)
    ds[(0, 0)]
    start = time.perf_counter()
    for i in range(n):
        ds[(0, i % len(ds))]
    return n / (time.perf_counter() - start)


def cpu(args: argparse.Namespace) -> dict[str, Any]:
    steps = 8 if args.quick else 14
    tiny = dict(arch="resnet18", image_size=64, out_dim=256, batch_size=32, device="cpu", epochs=1)
    results: dict[str, Any] = {"config": {**tiny, "data": str(CRIC), "steps": steps}, "runs": []}
    for workers in (0, 1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            r = job([str(CRIC)], Path(tmp) / "run", steps, workers=workers, **tiny)
        results["runs"].append(r)
        print(f"workers {workers}: {r['step_s_median']:.3f} s/step, {r['images_per_s']:.1f} img/s, "
              f"data wait {100 * r['data_wait_mean']:.1f}% (median {100 * r['data_wait_median']:.1f}%)", flush=True)
    for size in (64, 224):
        rate = views_per_second(str(CRIC), size, 200 if args.quick else 600)
        results[f"views_per_s_{size}px"] = rate
        print(f"view pipeline alone at {size} px: {rate:.0f} images/s in one process", flush=True)
    return results


def synthetic_tiles(root: Path, n: int, size: int = 320) -> Path:
    """n JPEG tiles of drawn Pap cells on a light background (no dataset on a bare GPU machine)."""
    import numpy as np
    from PIL import Image

    from cytoretrieve.sources.cells.synthetic import CLASSES, draw_cell

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    cells = [draw_cell(CLASSES[i % len(CLASSES)], 96, rng) for i in range(64)]
    for i in range(n):
        tile = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(215, 245, 3)))
        for _ in range(int(rng.integers(3, 9))):
            cell = cells[int(rng.integers(0, len(cells)))]
            tile.paste(cell, (int(rng.integers(-30, size - 60)), int(rng.integers(-30, size - 60))))
        tile.save(root / f"t{i:05d}.jpg", quality=90)
    return root


def model_only(recipe: str, batch: int, steps: int, compile_: bool) -> dict[str, Any]:
    """The DINO step (teacher + student forward, loss, backward, clip, optimiser, EMA) on resident views."""
    import torch

    from cytoretrieve.train.augment import normalize
    from cytoretrieve.train.config import RECIPES
    from cytoretrieve.train.head import build_student_teacher
    from cytoretrieve.train.loss import DINOLoss
    from cytoretrieve.train.optim import build_optimizer, clip_gradients, ema_update

    r = RECIPES[recipe]
    torch.backends.cudnn.benchmark = True
    student, teacher = build_student_teacher(r["arch"], image_size=224, out_dim=65536,
                                             norm_last_layer=r["norm_last_layer"], drop_path_rate=r["drop_path"])
    student, teacher = student.cuda(), teacher.cuda()
    cnn = recipe == "resnet50"
    if cnn:
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    if compile_:
        student.backbone.compile()
        teacher.backbone.compile()
    loss_fn = DINOLoss(65536, 2).cuda()
    opt = build_optimizer(r["optimizer"], student)
    views = [torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda") for _ in range(2)]

    def step() -> None:
        images = [normalize(v) for v in views]
        if cnn:
            images = [x.contiguous(memory_format=torch.channels_last) for x in images]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                t = teacher(images)
            loss = loss_fn(student(images), t, 0.04)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(student, 3.0)
        opt.step()
        ema_update(teacher.parameters(), student.parameters(), 0.996)

    for _ in range(5 if not compile_ else 15):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"recipe": recipe, "batch": batch, "step_s": seconds, "images_per_s": batch / seconds,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU")
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "model_only": [], "job": []}
    print(f"GPU: {results['gpu']}", flush=True)
    for recipe, batch in (("vit_small", 192), ("resnet50", 256)):
        r = model_only(recipe, batch, 10 if args.quick else 30, args.compile)
        results["model_only"].append(r)
        print(f"model step only, {recipe} batch {batch}: {r['images_per_s']:.0f} img/s ({r['step_s'] * 1000:.0f} ms/step,"
              f" {r['max_memory_gib']:.1f} GiB)", flush=True)
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        tiles = synthetic_tiles(Path(tmp) / "tiles", 2000 if args.quick else 4000)
        results["views_per_s_224px"] = views_per_second(str(tiles), 224, 300)
        print(f"view pipeline alone at 224 px: {results['views_per_s_224px']:.0f} images/s per core", flush=True)
        for recipe, batch in (("vit_small", 192), ("resnet50", 256)):
            r = job([str(tiles)], Path(tmp) / f"run_{recipe}", 12 if args.quick else 20, recipe=recipe,
                    batch_size=batch, epochs=1, device="cuda", compile=args.compile)
            r["recipe"] = recipe
            results["job"].append(r)
            print(f"whole job, {recipe} batch {batch}: {r['images_per_s']:.0f} img/s, data wait"
                  f" {100 * r['data_wait_mean']:.1f}%", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--gpu", action="store_true", help="the GPU figures (ViT-S/16 b192, ResNet50 b256, bf16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbones (GPU figures)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    info = _common.machine()
    _common.print_machine(info)
    results = gpu(args) if args.gpu else cpu(args)
    _common.write_json(args.json, {"machine": info, **results})


if __name__ == "__main__":
    main()
