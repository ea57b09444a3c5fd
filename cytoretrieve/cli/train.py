"""`cytoretrieve train` (DINO pre-training, 1 process or N under torchrun) and `cytoretrieve export` (checkpoint ->
safetensors + JSON that `embed --weights` reads). torch and timm are imported inside the commands only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

RECIPE_HELP = ("resnet50, vit_small or tiny (a short CPU run: resnet18 at 64 px, 10 epochs, weak colour jitter); default: vit_small for ViT "
               "arches, else resnet50. Fills every default below.")
Scale = tuple[float, float]


def _opt(*names: str, help: str, **kw: Any) -> Any:  # noqa: A002
    return typer.Option(*names, help=help, **kw)


# long by declaration only: one typer option per hyperparameter of the run; the body is a few lines
def train(
    data: Annotated[list[str] | None, _opt("--data", "-d", help="Training images: a tile table of --store (from `cytoretrieve tile`), a folder (all images below it, recursively; a slide = a top-level sub-folder), a Herlev/SIPaKMeD folder, or a CSV manifest (path,label[,group]). Repeat for several.")] = None,
    out: Annotated[Path | None, _opt("--out", "-o", help="Run folder: checkpoint.pth, log.jsonl, preview.png.")] = None,
    store: Annotated[str | None, _opt("--store", envvar="CYTORETRIEVE_STORE", help="Store holding the tile tables named by --data (default: indexes).")] = None,
    arch: Annotated[str | None, _opt("--arch", "-a", help="timm backbone, e.g. resnet50, vit_small_patch16_224, resnet18. Default: the recipe's.")] = None,
    recipe: Annotated[str | None, _opt("--recipe", help=RECIPE_HELP)] = None,
    epochs: Annotated[int | None, _opt("--epochs", help="Epochs (recipes: 300).")] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", help="Global batch, split evenly over the processes (resnet50 256, vit_small 192); lr scales with batch/256.")] = None,
    split: Annotated[Path | None, _opt("--split", help="Slide-level split file from `cytoretrieve split` (or a CSV slide,fold). Needs --fold.")] = None,
    fold: Annotated[int | None, _opt("--fold", help="Held-out fold: its slides' tiles are never seen.")] = None,
    image_size: Annotated[int | None, _opt("--image-size", help="Global crop side in px (224).")] = None,
    global_scale: Annotated[Scale | None, _opt("--global-scale", help="Global crop area range (0.14 1 with no local crops).")] = None,
    local_crops: Annotated[int | None, _opt("--local-crops", help="Local crops per image (0: the paper; they make ambiguous pairs on tiles).")] = None,
    local_size: Annotated[int | None, _opt("--local-size", help="Local crop side in px (96).")] = None,
    local_scale: Annotated[Scale | None, _opt("--local-scale", help="Local crop area range (resnet50 0.05 0.14, vit_small 0.05 0.4).")] = None,
    rot90: Annotated[bool | None, _opt("--rot90/--no-rot90", help="Random 90-degree rotations (default on: cells have no orientation).")] = None,
    vflip: Annotated[bool | None, _opt("--vflip/--no-vflip", help="Random vertical flips (default on).")] = None,
    hed_jitter: Annotated[float | None, _opt("--hed-jitter", help="HED stain jitter strength sigma (0 off; 0.05 light, 0.2 strong).")] = None,
    colour_strength: Annotated[float | None, _opt("--colour-strength", help="Scale of DINO's saturation (0.2) and hue (0.1) jitter: 1 DINO's, 0 none (tiny 0.25: Pap classes live in stain colour).")] = None,
    grayscale_p: Annotated[float | None, _opt("--grayscale-p", help="Probability of a grey view (DINO 0.2, tiny 0).")] = None,
    paste_cells: Annotated[list[str] | None, _opt("--paste-cells", help="Cell copy-paste source: a Herlev/SIPaKMeD/class-folder dataset, a CSV manifest, a folder of cell images, or a cell table of --store (`annotations import` -> <table>_cells). Repeatable.")] = None,
    paste_p: Annotated[float | None, _opt("--paste-p", help="Probability of pasting cells onto an image (0.5).")] = None,
    paste_max: Annotated[int | None, _opt("--paste-max", help="At most this many cells per image (3).")] = None,
    paste_scale: Annotated[Scale | None, _opt("--paste-scale", help="Pasted cell's longer side as a fraction of the image's shorter side (0.1 0.4).")] = None,
    out_dim: Annotated[int | None, _opt("--out-dim", help="DINO head output dimension (65536).")] = None,
    hidden_dim: Annotated[int | None, _opt("--hidden-dim", help="Head MLP hidden size (2048).")] = None,
    bottleneck_dim: Annotated[int | None, _opt("--bottleneck-dim", help="Head bottleneck (256).")] = None,
    head_layers: Annotated[int | None, _opt("--head-layers", help="Head MLP layers (3).")] = None,
    use_bn_in_head: Annotated[bool | None, _opt("--bn-in-head/--no-bn-in-head", help="BatchNorm in the head MLP (off).")] = None,
    norm_last_layer: Annotated[bool | None, _opt("--norm-last-layer/--no-norm-last-layer", help="Fix the last layer's weight norm (resnet50 on, vit_small off).")] = None,
    momentum_teacher: Annotated[float | None, _opt("--momentum-teacher", help="Base teacher EMA momentum, cosine to 1 (resnet50 0.9995, vit_small 0.996).")] = None,
    warmup_teacher_temp: Annotated[float | None, _opt("--warmup-teacher-temp", help="Teacher temperature at the start (0.04).")] = None,
    teacher_temp: Annotated[float | None, _opt("--teacher-temp", help="Teacher temperature after warm-up (resnet50 0.04, vit_small 0.07).")] = None,
    warmup_teacher_temp_epochs: Annotated[int | None, _opt("--warmup-teacher-temp-epochs", help="Teacher temperature warm-up epochs (resnet50 0, vit_small 30).")] = None,
    student_temp: Annotated[float | None, _opt("--student-temp", help="Student temperature (0.1).")] = None,
    center_momentum: Annotated[float | None, _opt("--center-momentum", help="Centre EMA momentum (0.9).")] = None,
    optimizer: Annotated[str | None, _opt("--optimizer", help="adamw or sgd (resnet50 sgd, vit_small adamw).")] = None,
    lr: Annotated[float | None, _opt("--lr", help="Peak learning rate at batch 256 (resnet50 0.03, vit_small 5e-4).")] = None,
    min_lr: Annotated[float | None, _opt("--min-lr", help="Final learning rate of the cosine (1e-6).")] = None,
    warmup_epochs: Annotated[int | None, _opt("--warmup-epochs", help="Linear lr warm-up epochs (10).")] = None,
    weight_decay: Annotated[float | None, _opt("--weight-decay", help="Weight decay at the start (resnet50 1e-4, vit_small 0.04).")] = None,
    weight_decay_end: Annotated[float | None, _opt("--weight-decay-end", help="Weight decay at the end, cosine (resnet50 1e-4, vit_small 0.4).")] = None,
    clip_grad: Annotated[float | None, _opt("--clip-grad", help="Per-parameter gradient norm clip (3.0; 0 off).")] = None,
    freeze_last_layer: Annotated[int | None, _opt("--freeze-last-layer", help="Epochs with the head's last layer frozen (1).")] = None,
    drop_path: Annotated[float | None, _opt("--drop-path", help="Stochastic depth rate of the student (vit_small 0.1, resnet50 0).")] = None,
    seed: Annotated[int | None, _opt("--seed", help="Seed of the init, the data order and every augmentation (0).")] = None,
    workers: Annotated[int | None, _opt("--workers", min=0, help="DataLoader workers per process; default most cores on a GPU, 1 on a CPU.")] = None,
    device: Annotated[str | None, _opt("--device", help="auto (CUDA when present), cpu or cuda.")] = None,
    precision: Annotated[str | None, _opt("--precision", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with a grad scaler) or fp32.")] = None,
    compile_: Annotated[bool | None, _opt("--compile/--no-compile", help="torch.compile the backbones (slow start, faster steps).")] = None,
    deterministic: Annotated[bool | None, _opt("--deterministic/--no-deterministic", help="torch deterministic algorithms (bit-exact resume on a CPU).")] = None,
    log_every: Annotated[int | None, _opt("--log-every", help="Write a log.jsonl line every N steps (1).")] = None,
    save_every: Annotated[int | None, _opt("--save-every", help="Also keep checkpoint_eNNNN.pth every N epochs (0: only the latest).")] = None,
    max_steps: Annotated[int | None, _opt("--max-steps", help="Stop (with a checkpoint) after this many steps in all; --resume continues.")] = None,
    resume: Annotated[bool, _opt("--resume", help="Continue the run in --out exactly where its checkpoint.pth stopped.")] = False,
    preview: Annotated[int | None, _opt("--preview", min=1, help="Write OUT/preview.png with N images and their augmented views, then exit.")] = None,
) -> None:
    """Pre-train a backbone with DINO on unlabelled tiles or cells; export it with `cytoretrieve export`.

    The recipes are the official DINO ones without local crops: `--recipe resnet50` (SGD, lr 0.03, batch 256)
    and `--recipe vit_small` (AdamW, lr 5e-4, batch 192, teacher temperature 0.04 -> 0.07). A checkpoint is
    written every epoch and on Ctrl-C; `--resume` continues exactly. Several GPUs or nodes: the same command
    under torchrun, e.g. `torchrun --nproc_per_node 8 -m cytoretrieve.train --data tiles --recipe vit_small --out runs/vits`.

    Example (CPU, a short run): cytoretrieve train --data cells/ --recipe tiny --out runs/tiny
    """
    from rich.console import Console

    from cytoretrieve.errors import CytoError
    from cytoretrieve.train.config import make_config

    if out is None:
        raise CytoError("no run folder: pass --out DIR (checkpoints and the log go there)")
    given: dict[str, Any] = dict(
        epochs=epochs, batch_size=batch_size, split=str(split) if split else None, fold=fold, image_size=image_size,
        global_scale=global_scale, local_crops=local_crops, local_size=local_size, local_scale=local_scale,
        rot90=rot90, vflip=vflip, hed_jitter=hed_jitter, colour_strength=colour_strength,
        grayscale_p=grayscale_p, paste_cells=paste_cells or None, paste_p=paste_p,
        paste_max=paste_max, paste_scale=paste_scale, out_dim=out_dim, hidden_dim=hidden_dim,
        bottleneck_dim=bottleneck_dim, head_layers=head_layers, use_bn_in_head=use_bn_in_head,
        norm_last_layer=norm_last_layer, momentum_teacher=momentum_teacher, warmup_teacher_temp=warmup_teacher_temp,
        teacher_temp=teacher_temp, warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, student_temp=student_temp,
        center_momentum=center_momentum, optimizer=optimizer, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs,
        weight_decay=weight_decay, weight_decay_end=weight_decay_end, clip_grad=clip_grad,
        freeze_last_layer=freeze_last_layer, drop_path=drop_path, seed=seed, workers=workers, device=device,
        precision=precision, compile=compile_, deterministic=deterministic, log_every=log_every,
        save_every=save_every, max_steps=max_steps, store=store,
    )
    if resume:
        from cytoretrieve.train.resume import resume_config

        config = resume_config(out, {**given, "data": data, "arch": arch, "recipe": recipe})
    else:
        if not data:
            raise CytoError("no training data: pass --data with a tile table, a folder of images or a CSV manifest")
        from cytoretrieve.sources.resolve import resolve_source

        for spec in data:  # a bad path fails here, in well under a second, before torch and timm load
            resolve_source(spec, param="data")
        config = make_config(data, str(out), arch=arch, recipe=recipe, **given)

    console = Console(stderr=True)
    main = int(os.environ.get("RANK", "0")) == 0
    if preview is not None:
        from cytoretrieve.train.data import build_dataset
        from cytoretrieve.views.train_preview import write_preview

        dataset, _ = build_dataset(config)
        path = write_preview(dataset, preview, Path(config.out) / "preview.png")
        if main:
            typer.echo(str(path))
        return
    _run_training(config, resume, console, main)


def _run_training(config, resume: bool, console, main: bool) -> None:  # noqa: ANN001
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from cytoretrieve.train.loop import train as run_train

    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
        TextColumn("data {task.fields[wait]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )
    task = None

    def on_start(info) -> None:  # noqa: ANN001
        nonlocal task
        console.print(
            f"DINO {config.arch} ({config.recipe} recipe): {info.images} images"
            + (f" ({info.held_out_slides} held-out slides of fold {config.fold} left out)" if config.split else "")
            + f"; {info.world_size} process(es) on {info.device}, {info.batch_per_process} images each per step,"
            f" {info.iters_per_epoch} steps/epoch, {info.precision}, {info.workers} workers"
            + (f"; resuming at step {info.start_step}" if info.start_step else "")
        )
        progress.start()
        task = progress.add_task("train", total=info.total_steps, completed=info.start_step, epoch=info.start_step // info.iters_per_epoch,
                                 loss="...", rate="...", wait="...")

    def on_step(s) -> None:  # noqa: ANN001
        if task is not None:
            progress.update(task, completed=s.step, epoch=s.epoch, loss=f"{s.loss:.4f}", rate=f"{s.images_per_s:.1f}",
                            wait=f"{100 * s.data_wait:.0f}%")

    def on_event(name: str, fields: dict) -> None:
        if name == "warning":
            console.print(f"[yellow]warning:[/] {fields.get('message')}")

    try:
        report = run_train(config, resume=resume, on_start=on_start, on_step=on_step, on_event=on_event)
    finally:
        if task is not None:  # a progress bar never started would print an empty line on stop
            progress.stop()
    if not main:
        return
    loss = (f"; loss {report.first_loss:.4f} -> {report.last_loss:.4f}" if report.first_loss is not None else "")
    speed = (f"; {report.images_per_s:.1f} img/s, {100 * report.data_wait:.1f}% waiting for data"
             if report.images_per_s else "")
    typer.echo(f"{report.steps}/{report.total_steps} steps ({report.epochs_done} epochs) in {report.seconds:.1f} s{loss}{speed}")
    if report.checkpoint:
        typer.echo(f"checkpoint: {report.checkpoint}  (log: {report.log})")
        stem = Path(config.out) / "backbone.safetensors"
        if report.finished:
            typer.echo(f"next: cytoretrieve export {report.checkpoint} --out {stem}")
    if report.interrupted:
        console.print("interrupted: the checkpoint holds the last whole step; rerun with --resume to continue")
        raise typer.Exit(130)


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint (RUN/checkpoint.pth).")],
    out: Annotated[Path, _opt("--out", "-o", help="The .safetensors file to write; its JSON config goes beside it (same stem).")],
    network: Annotated[str, _opt("--network", help="teacher (DINO's choice) or student.")] = "teacher",
    resize: Annotated[str, _opt("--resize", help="How embed frames images: letterbox, stretch or center-crop.")] = "letterbox",
    image_size: Annotated[int | None, _opt("--image-size", help="Input side for embed; default the training crop size.")] = None,
) -> None:
    """Write a checkpoint's teacher backbone as safetensors + JSON config, ready for `embed --weights`.

    The JSON (`{"arch": ..., "preprocessing": {...}, "dino": {...}}`) tells embed the architecture and the
    preprocessing; the printed fingerprint is the one every table embedded with these weights records.

    Example: cytoretrieve export runs/vits/checkpoint.pth --out models/dino_vits.safetensors
    """
    from cytoretrieve.train.export import export as run_export

    report = run_export(checkpoint, out, which=network, resize=resize, image_size=image_size)
    typer.echo(f"{report.weights}  ({report.arch}, {report.dim}-d, {report.tensors} tensors, epoch {report.epoch}, step {report.step})")
    typer.echo(f"config: {report.config}")
    typer.echo(f"fingerprint: {report.fingerprint}")
    typer.echo(f"embed with: cytoretrieve embed DATASET --backbone {report.arch} --weights {report.weights}")
