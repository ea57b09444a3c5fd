"""The DINO training job: one process or N under torchrun, exact resume, JSON-lines log, checkpoints.

One step (as main_dino.train_one_epoch): set lr and weight decay from their schedules; teacher on the 2 global
views, student on every view; DINO loss (which moves the centre); backward; per-parameter gradient clipping;
last layer's gradients dropped during the first epoch(s); optimiser step; teacher <- EMA of the student.

Exact resume: the data order depends on (seed, epoch), a sample's augmentation on (seed, epoch, index), and
the model's own randomness (drop-path) is reseeded from (seed, rank, step) at every step, so a run stopped at
step s and resumed from its checkpoint computes what the uninterrupted run computes (bit for bit on a CPU
with deterministic settings), whatever the number of DataLoader workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from cytoretrieve.errors import CytoError
from cytoretrieve.train import checkpoint as ckpt
from cytoretrieve.train.augment import DinoViews, PasteSpec, ViewSpec, normalize
from cytoretrieve.train.config import TrainConfig
from cytoretrieve.train.data import TrainDataset, apply_split, make_loader, open_cell_bank, open_sources, read_split
from cytoretrieve.train.distributed import Dist, any_rank, all_reduce_mean, barrier, setup, teardown
from cytoretrieve.train.head import DINOModel, build_student_teacher
from cytoretrieve.train.loss import DINOLoss
from cytoretrieve.train.optim import (
    build_optimizer,
    cancel_gradients_last_layer,
    clip_gradients,
    ema_update,
    has_batchnorms,
)
from cytoretrieve.train.schedules import cosine_scheduler, teacher_temp_schedule

LOG = "log.jsonl"


@dataclass
class StepStats:
    """One line of the JSON-lines log (rank 0; loss and entropies averaged over the processes)."""

    step: int  # steps done, this one included
    epoch: int
    loss: float
    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    teacher_entropy: float
    teacher_batch_entropy: float
    images_per_s: float
    step_s: float
    data_wait: float  # fraction of the step spent waiting for the batch
    bad_images: int = 0


@dataclass
class TrainReport:
    out: str
    checkpoint: str | None
    log: str
    images: int
    held_out_slides: int
    start_step: int
    steps: int  # steps done in total (including those before a resume)
    total_steps: int
    epochs_done: int
    first_loss: float | None = None
    last_loss: float | None = None
    seconds: float = 0.0
    images_per_s: float = 0.0  # mean over this run's steps, the first one excluded
    data_wait: float = 0.0
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps


@dataclass
class StartInfo:
    images: int
    held_out_slides: int
    world_size: int
    device: str
    batch_per_process: int
    iters_per_epoch: int
    total_steps: int
    start_step: int
    precision: str
    workers: int


class CollapseWatch:
    """Warns (once) when the loss sits at ln(out_dim), the DINO collapse signature: uniform teacher and
    student outputs. Watched after `min_step` (the first epoch / frozen last layer), over `window` steps."""

    def __init__(self, out_dim: int, *, min_step: int, window: int = 50, rtol: float = 0.01) -> None:
        self.target = math.log(out_dim)
        self.min_step, self.rtol = min_step, rtol
        self.losses: deque[float] = deque(maxlen=max(1, window))
        self.warned = False

    def update(self, step: int, loss: float) -> str | None:
        self.losses.append(loss)
        if self.warned or step < self.min_step or len(self.losses) < self.losses.maxlen:
            return None
        mean = sum(self.losses) / len(self.losses)
        if abs(mean - self.target) <= self.rtol * self.target:
            self.warned = True
            return (f"possible collapse: the loss has sat at ln(out_dim) = {self.target:.3f} for the last "
                    f"{len(self.losses)} steps (mean {mean:.3f}, step {step}); try a lower teacher temperature, "
                    "a higher teacher momentum, or check the data")
        return None


def build_dataset(config: TrainConfig) -> tuple[TrainDataset, int]:
    """The training dataset (after the split) and the number of held-out slides."""
    source = open_sources(config.data, config.store)
    held_out = 0
    if config.split is not None:
        source, held_out = apply_split(source, read_split(config.split), int(config.fold))
    views = DinoViews(ViewSpec(
        image_size=config.image_size, global_scale=tuple(config.global_scale), local_crops=config.local_crops,
        local_size=config.local_size, local_scale=tuple(config.local_scale), rot90=config.rot90,
        vflip=config.vflip, hed_jitter=config.hed_jitter,
    ))
    bank = open_cell_bank(config.paste_cells, config.store) if config.paste_cells else None
    paste = PasteSpec(p=config.paste_p, max_cells=config.paste_max, scale=tuple(config.paste_scale)) if bank else None
    return TrainDataset(source, views, config.seed, bank, paste), held_out


def default_workers(d: Dist) -> int:
    """Per process: most of this process's share of the cores on a GPU (decoding and augmenting is the
    bottleneck), one on a CPU (the cores are needed for the model)."""
    cores = max(1, (os.cpu_count() or 2) // max(1, d.local_world_size))
    if d.device.startswith("cuda"):
        return max(1, min(12, cores - 1))
    return 1 if cores >= 2 else 0


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, 7, rank, step]).generate_state(1, np.uint64)[0] >> 1)


class _StopFlag:
    """Ctrl-C / SIGTERM ask for a stop at the end of the current step (then a checkpoint); a second Ctrl-C
    interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt now

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ignore_sigint(_: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops cleanly after the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _is_cnn(model: torch.nn.Module) -> bool:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def _precision(config: TrainConfig, device: str) -> str:
    cuda = device.startswith("cuda")
    if config.precision == "auto":
        return "bf16" if cuda else "fp32"
    if config.precision == "fp16" and not cuda:
        raise CytoError("`precision` fp16 needs a CUDA GPU: use fp32 (or bf16) on a CPU")
    return config.precision


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_start: Callable[[StartInfo], None] | None = None,
    on_step: Callable[[StepStats], None] | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> TrainReport:
    """Train DINO as `config` says, writing `config.out`/checkpoint.pth (every epoch, on Ctrl-C / SIGTERM, at
    --max-steps) and `config.out`/log.jsonl. With `resume`, continue exactly from the checkpoint there.

    Works alone or under torchrun (DDP, one process per GPU, or gloo on CPUs). Callbacks run on rank 0 only;
    `on_step` raising KeyboardInterrupt stops the run after that step, with a checkpoint, like Ctrl-C.
    """
    config.validate()
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                     torch.backends.cudnn.benchmark)
    d = setup(config.device)
    try:
        return _train(config, d, resume, on_start, on_step, on_event)
    finally:
        teardown(d)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = deterministic[2]


def _train(config: TrainConfig, d: Dist, resume: bool, on_start, on_step, on_event) -> TrainReport:  # noqa: ANN001, C901
    started = time.perf_counter()
    out = Path(config.out).expanduser()
    last_path = out / ckpt.LAST
    if last_path.exists() and not resume:
        raise CytoError(f"{out} already holds a checkpoint: pass `resume` to continue that run, or choose another `out`")
    state = ckpt.load(last_path) if resume else None
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    precision = _precision(config, d.device)
    cuda = d.device.startswith("cuda")
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif cuda:
        torch.backends.cudnn.benchmark = True

    # data
    dataset, held_out = build_dataset(config)
    if config.batch_size % d.world_size:
        raise CytoError(f"`batch_size` {config.batch_size} does not split evenly over {d.world_size} processes")
    per_rank = config.batch_size // d.world_size
    workers = default_workers(d) if config.workers is None else int(config.workers)
    loader = make_loader(dataset, rank=d.rank, world_size=d.world_size, batch_size=per_rank, seed=config.seed,
                         workers=workers, pin_memory=cuda, worker_init_fn=_ignore_sigint if workers else None)
    ipe = loader.sampler.batches
    if ipe < 1:
        raise CytoError(f"{len(dataset)} training images are too few for a batch of {config.batch_size}: lower `batch_size`")
    total_steps = ipe * config.epochs
    data_digest = dataset.source.digest()

    # models
    torch.manual_seed(config.seed)
    student, teacher = build_student_teacher(
        config.arch, image_size=config.image_size, out_dim=config.out_dim, hidden_dim=config.hidden_dim,
        bottleneck_dim=config.bottleneck_dim, nlayers=config.head_layers, use_bn_in_head=config.use_bn_in_head,
        norm_last_layer=config.norm_last_layer, drop_path_rate=config.drop_path,
    )
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
    channels_last = cuda and _is_cnn(student.backbone)
    student, teacher = student.to(d.device), teacher.to(d.device)
    if channels_last:
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    if d.enabled and cuda and has_batchnorms(student):
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    if config.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    student_module: DINOModel = student
    if d.enabled:
        student = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[torch.device(d.device).index] if cuda else None)
    teacher.train()  # as in DINO: BatchNorm in the teacher uses batch statistics

    n_views = 2 + config.local_crops
    dino_loss = DINOLoss(config.out_dim, n_views, student_temp=config.student_temp,
                         center_momentum=config.center_momentum).to(d.device)
    optimizer = build_optimizer(config.optimizer, student_module)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    lr_schedule = cosine_scheduler(config.lr * config.batch_size / 256.0, config.min_lr, config.epochs, ipe,
                                   warmup_epochs=config.warmup_epochs)
    wd_schedule = cosine_scheduler(config.weight_decay, config.weight_decay_end, config.epochs, ipe)
    momentum_schedule = cosine_scheduler(config.momentum_teacher, 1.0, config.epochs, ipe)
    temp_schedule = teacher_temp_schedule(config.warmup_teacher_temp, config.teacher_temp,
                                          config.warmup_teacher_temp_epochs, config.epochs)

    start_step = 0
    if state is not None:
        if state.get("data", {}).get("digest") != data_digest:
            raise CytoError(
                f"the training data changed since the checkpoint ({state.get('data', {}).get('images')} images"
                f" then, {len(dataset)} now): resuming needs the same images"
            )
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        dino_loss.center.copy_(state["center"].to(d.device))
        start_step = int(state["step"])
        ckpt.set_rng_state(state["rng"])
        if int(state.get("world_size", 1)) != d.world_size:
            _emit(on_event, d, "warning", message=f"resuming with {d.world_size} processes instead of "
                  f"{state.get('world_size')}: the continuation is valid but not bit-identical")

    log_file: TextIO | None = (out / LOG).open("a", buffering=1) if d.is_main else None
    report = TrainReport(out=str(out), checkpoint=None, log=str(out / LOG), images=len(dataset),
                         held_out_slides=held_out, start_step=start_step, steps=start_step,
                         total_steps=total_steps, epochs_done=start_step // ipe)
    watch = CollapseWatch(config.out_dim, min_step=ipe * max(1, config.freeze_last_layer), window=min(50, max(5, ipe)))

    def event(name: str, **fields: Any) -> None:
        if log_file is not None:
            log_file.write(json.dumps({"event": name, **fields}, default=str) + "\n")
        _emit(on_event, d, name, **fields)

    def save(step: int, *, snapshot: bool = False) -> None:
        if d.is_main:
            payload = {
                "student": student_module.state_dict(),
                "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "center": dino_loss.center.detach().cpu().clone(),
                "epoch": step // ipe,
                "step": step,
                "iters_per_epoch": ipe,
                "world_size": d.world_size,
                "args": config.to_dict(),
                "rng": ckpt.rng_state(),
                "data": {"images": len(dataset), "digest": data_digest},
            }
            ckpt.save(payload, last_path)
            if snapshot:
                ckpt.save(payload, out / f"checkpoint_e{step // ipe:04d}.pth")
            report.checkpoint = str(last_path)
            event("checkpoint", step=step, epoch=step // ipe, path=str(last_path))
        barrier(d)

    info = StartInfo(images=len(dataset), held_out_slides=held_out, world_size=d.world_size, device=d.device,
                     batch_per_process=per_rank, iters_per_epoch=ipe, total_steps=total_steps,
                     start_step=start_step, precision=precision, workers=workers)
    event("start", **asdict(info), resumed=state is not None, config=config.to_dict())
    if on_start is not None and d.is_main:
        on_start(info)

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    step = start_step
    last_saved = start_step
    rates: list[float] = []
    waits: list[float] = []
    stop_at = min(total_steps, config.max_steps) if config.max_steps else total_steps

    def one_step(views: list[torch.Tensor], it: int, epoch: int) -> tuple[float, float]:
        """The DINO update for global iteration `it`; returns (loss, teacher momentum)."""
        torch.manual_seed(_step_seed(config.seed, d.rank, it))  # drop-path etc.: same draws after a resume
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = float(lr_schedule[it])
            if i == 0:  # only the first group is regularised
                group["weight_decay"] = float(wd_schedule[it])
        images = []
        for v in views:
            x = normalize(v.to(d.device, non_blocking=True), config.mean, config.std)
            images.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        amp = (torch.autocast(device_type="cuda" if cuda else "cpu", dtype=autocast_dtype)
               if autocast_dtype is not None else contextlib.nullcontext())
        with amp:
            with torch.no_grad():
                teacher_output = teacher(images[:2])  # only the 2 global views pass through the teacher
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, float(temp_schedule[epoch]))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if config.clip_grad:
                scaler.unscale_(optimizer)
                clip_gradients(student_module, config.clip_grad)
            cancel_gradients_last_layer(epoch, student_module, config.freeze_last_layer)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if config.clip_grad:
                clip_gradients(student_module, config.clip_grad)
            cancel_gradients_last_layer(epoch, student_module, config.freeze_last_layer)
            optimizer.step()
        momentum = float(momentum_schedule[it])
        ema_update(teacher.parameters(), student_module.parameters(), momentum)
        return float(loss.item()), momentum  # .item() synchronises: step timings are real

    with _StopFlag() as flag, contextlib.ExitStack() as cleanup:
        if log_file is not None:
            cleanup.callback(log_file.close)
        try:
            while step < stop_at and not report.interrupted:
                epoch = step // ipe
                batches = loader.epoch(epoch, skip_batches=step % ipe)
                t_prev = time.perf_counter()
                while step < stop_at:
                    try:
                        views, bad = next(batches)
                    except StopIteration:
                        break
                    except RuntimeError:
                        if flag.requested:  # a DataLoader worker hit by the same Ctrl-C
                            report.interrupted = True
                            break
                        raise
                    t_data = time.perf_counter()
                    it = step
                    loss_value, momentum = one_step(views, it, epoch)
                    step = report.steps = it + 1
                    t_end = time.perf_counter()
                    step_s = max(t_end - t_prev, 1e-9)
                    wait, rate = (t_data - t_prev) / step_s, config.batch_size / step_s
                    t_prev = t_end
                    if step > start_step + 1:  # the first step pays for worker start-up and warm-up
                        rates.append(rate)
                        waits.append(wait)
                    nonfinite = not math.isfinite(loss_value)
                    if step % config.log_every == 0 or step == stop_at:
                        s = dino_loss.last_stats
                        packed = torch.tensor([loss_value, float(s["teacher_entropy"]),
                                               float(s["teacher_batch_entropy"]), float(bad)], dtype=torch.float64)
                        if d.enabled:
                            packed = all_reduce_mean(packed.to(d.device), d).cpu()
                        stats = StepStats(
                            step=step, epoch=epoch, loss=float(packed[0]), lr=float(lr_schedule[it]),
                            wd=float(wd_schedule[it]), momentum=momentum, teacher_temp=float(temp_schedule[epoch]),
                            teacher_entropy=float(packed[1]), teacher_batch_entropy=float(packed[2]),
                            images_per_s=rate, step_s=step_s, data_wait=wait,
                            bad_images=int(round(float(packed[3]) * d.world_size)),
                        )
                        if log_file is not None:
                            log_file.write(json.dumps(asdict(stats)) + "\n")
                        if report.first_loss is None:
                            report.first_loss = stats.loss
                        report.last_loss = stats.loss
                        message = watch.update(step, stats.loss)
                        if message:
                            report.warnings.append(message)
                            event("warning", step=step, message=message)
                        if on_step is not None and d.is_main and not nonfinite:
                            try:
                                on_step(stats)
                            except KeyboardInterrupt:
                                flag.requested = True
                    any_nonfinite, any_stop = any_rank([nonfinite, flag.requested], d)
                    if any_nonfinite:
                        raise CytoError(
                            f"the loss is {loss_value} at step {step}: training diverged (nothing saved after the"
                            " last checkpoint); lower `lr`, raise `warmup_epochs`, or use `precision` fp32"
                        )
                    if any_stop:
                        report.interrupted = True
                        break
                if not report.interrupted and step % ipe == 0 and step > last_saved:
                    epoch_done = step // ipe
                    save(step, snapshot=bool(config.save_every) and epoch_done % config.save_every == 0)
                    last_saved = step
        except KeyboardInterrupt:
            # a second Ctrl-C lands anywhere, possibly mid-update: keep the last consistent checkpoint
            report.interrupted = True
            event("warning", step=step, message="interrupted twice: no new checkpoint (the last one is intact)")
            last_saved = step
        if step > last_saved:  # Ctrl-C, SIGTERM or --max-steps between epochs
            save(step)
        report.epochs_done = step // ipe
        report.steps = step
        report.seconds = time.perf_counter() - started
        report.images_per_s = float(np.mean(rates)) if rates else 0.0
        report.data_wait = float(np.mean(waits)) if waits else 0.0
        event("end" if report.finished else ("interrupted" if report.interrupted else "stopped"), step=step,
              seconds=round(report.seconds, 3))
    return report


def _emit(on_event, d: Dist, name: str, **fields: Any) -> None:  # noqa: ANN001
    if on_event is not None and d.is_main:
        on_event(name, fields)
