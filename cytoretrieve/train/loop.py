"""The DINO training job: one process or N under torchrun, exact resume, JSON-lines log, checkpoints.

Shaped as main_dino: `train` builds the run (`run.build_run`), then per epoch `train_one_epoch` and a checkpoint
(`run.save_checkpoint`). One step (`dino_step`, as in train_one_epoch): set lr and weight decay from their
schedules; teacher on the 2 global views, student on every view; DINO loss (which moves the centre); backward;
per-parameter gradient clipping; last layer's gradients dropped during the first epoch(s); optimiser step;
teacher <- EMA of the student.

Exact resume: the data order depends on (seed, epoch), a sample's augmentation on (seed, epoch, index), and
the model's own randomness (drop-path) is reseeded from (seed, rank, step) at every step, so a run stopped at
step s and resumed from its checkpoint computes what the uninterrupted run computes (bit for bit on a CPU
with deterministic settings), whatever the number of DataLoader workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from cytoretrieve.distributed import Dist, all_reduce_mean, any_rank, setup, teardown
from cytoretrieve.errors import CytoError
from cytoretrieve.train.augment import normalize
from cytoretrieve.train.collapse import CollapseWatch
from cytoretrieve.train.config import TrainConfig
from cytoretrieve.train.optim import cancel_gradients_last_layer, clip_gradients, ema_update
from cytoretrieve.train.run import Run, build_run, load_state, save_checkpoint

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


StepCallback = Callable[[StepStats], None]
EventCallback = Callable[[str, dict[str, Any]], None]


class RunLog:
    """The run's JSON-lines log (written by rank 0) and the caller's `on_event` (called on rank 0): every
    event goes to both, every logged step to the file."""

    def __init__(self, path: Path, d: Dist, on_event: EventCallback | None) -> None:
        self.path = path
        self.file: TextIO | None = path.open("a", buffering=1) if d.is_main else None
        self.on_event = on_event if d.is_main else None

    def event(self, name: str, **fields: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": name, **fields}, default=str) + "\n")
        if self.on_event is not None:
            self.on_event(name, fields)

    def step(self, stats: StepStats) -> None:
        if self.file is not None:
            self.file.write(json.dumps(asdict(stats)) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass
class _Progress:
    """What the epochs share: the report being filled, the log, the collapse watch, the stop flag, timings."""

    report: TrainReport
    log: RunLog
    watch: CollapseWatch
    stop: _StopFlag
    stop_at: int
    on_step: StepCallback | None  # None on ranks other than 0
    rates: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_start: Callable[[StartInfo], None] | None = None,
    on_step: StepCallback | None = None,
    on_event: EventCallback | None = None,
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


def _train(config: TrainConfig, d: Dist, resume: bool, on_start: Callable[[StartInfo], None] | None,
           on_step: StepCallback | None, on_event: EventCallback | None) -> TrainReport:
    """Build the run, then epochs and checkpoints until the end, --max-steps, a stop request or divergence."""
    started = time.perf_counter()
    out = Path(config.out).expanduser()
    state = load_state(out, resume)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    run = build_run(config, d, out, state)
    ipe = run.iters_per_epoch
    report = TrainReport(out=str(out), checkpoint=None, log=str(out / LOG), images=len(run.dataset),
                         held_out_slides=run.held_out, start_step=run.start_step, steps=run.start_step,
                         total_steps=run.total_steps, epochs_done=run.start_step // ipe)
    log = RunLog(out / LOG, d, on_event)
    for message in run.warnings:
        log.event("warning", message=message)
    info = StartInfo(images=len(run.dataset), held_out_slides=run.held_out, world_size=d.world_size, device=d.device,
                     batch_per_process=run.per_rank, iters_per_epoch=ipe, total_steps=run.total_steps,
                     start_step=run.start_step, precision=run.precision, workers=run.workers)
    log.event("start", **asdict(info), resumed=state is not None, config=config.to_dict())
    if on_start is not None and d.is_main:
        on_start(info)
    warm_up = max(1, config.warmup_epochs, config.freeze_last_layer)  # epochs; outputs start near-uniform
    watch = CollapseWatch(config.out_dim, after_step=ipe * warm_up,
                          window=min(50, max(5, ipe)))
    stop_at = min(run.total_steps, config.max_steps) if config.max_steps else run.total_steps
    with _StopFlag() as flag, contextlib.closing(log):
        p = _Progress(report, log, watch, flag, stop_at, on_step if d.is_main else None)
        last_saved = run.start_step
        try:
            while report.steps < stop_at and not report.interrupted:
                train_one_epoch(run, p, report.steps // ipe)
                epoch_done = report.steps // ipe
                if not report.interrupted and report.steps % ipe == 0 and report.steps > last_saved:
                    _save(run, p, snapshot=bool(config.save_every) and epoch_done % config.save_every == 0)
                    last_saved = report.steps
        except KeyboardInterrupt:
            # a second Ctrl-C lands anywhere, possibly mid-update: keep the last consistent checkpoint
            report.interrupted = True
            log.event("warning", step=report.steps, message="interrupted twice: no new checkpoint (the last one is intact)")
            last_saved = report.steps
        if report.steps > last_saved:  # Ctrl-C, SIGTERM or --max-steps between epochs
            _save(run, p)
        report.epochs_done = report.steps // ipe
        report.seconds = time.perf_counter() - started
        report.images_per_s = float(np.mean(p.rates)) if p.rates else 0.0
        report.data_wait = float(np.mean(p.waits)) if p.waits else 0.0
        log.event("end" if report.finished else ("interrupted" if report.interrupted else "stopped"),
                  step=report.steps, seconds=round(report.seconds, 3))
    return report


def train_one_epoch(run: Run, p: _Progress, epoch: int) -> None:
    """The rest of `epoch` (from the step the report is at): a DINO step per batch, logged every
    `log_every` steps; stops early at `stop_at`, on a stop request from any rank, or (CytoError) on a
    non-finite loss."""
    report, d = p.report, run.d
    batches = run.loader.epoch(epoch, skip_batches=report.steps % run.iters_per_epoch)
    t_prev = time.perf_counter()
    while report.steps < p.stop_at:
        try:
            views, bad = next(batches)
        except StopIteration:
            return
        except RuntimeError:
            if p.stop.requested:  # a DataLoader worker hit by the same Ctrl-C
                report.interrupted = True
                return
            raise
        t_data = time.perf_counter()
        it = report.steps
        loss_value, momentum = dino_step(run, views, it, epoch)
        report.steps = it + 1
        t_end = time.perf_counter()
        step_s = max(t_end - t_prev, 1e-9)
        wait, rate = (t_data - t_prev) / step_s, run.config.batch_size / step_s
        t_prev = t_end
        if report.steps > report.start_step + 1:  # the first step pays for worker start-up and warm-up
            p.rates.append(rate)
            p.waits.append(wait)
        nonfinite = not math.isfinite(loss_value)
        if report.steps % run.config.log_every == 0 or report.steps == p.stop_at:
            stats = _step_stats(run, it, epoch, loss_value, momentum, bad, rate, step_s, wait)
            _record(p, stats, call_back=not nonfinite)
        any_nonfinite, any_stop = any_rank([nonfinite, p.stop.requested], d)
        if any_nonfinite:
            raise CytoError(
                f"the loss is {loss_value} at step {report.steps}: training diverged (nothing saved after the"
                " last checkpoint); lower `lr`, raise `warmup_epochs`, or use `precision` fp32"
            )
        if any_stop:
            report.interrupted = True
            return


def dino_step(run: Run, views: list[torch.Tensor], it: int, epoch: int) -> tuple[float, float]:
    """The DINO update for global iteration `it`; returns (loss, teacher momentum)."""
    c, d, s = run.config, run.d, run.schedules
    torch.manual_seed(_step_seed(c.seed, d.rank, it))  # drop-path etc.: same draws after a resume
    for i, group in enumerate(run.optimizer.param_groups):
        group["lr"] = float(s.lr[it])
        if i == 0:  # only the first group is regularised
            group["weight_decay"] = float(s.wd[it])
    images = []
    for v in views:
        x = normalize(v.to(d.device, non_blocking=True), c.mean, c.std)
        images.append(x.contiguous(memory_format=torch.channels_last) if run.channels_last else x)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.precision)
    amp = (torch.autocast(device_type="cuda" if run.cuda else "cpu", dtype=dtype)
           if dtype is not None else contextlib.nullcontext())
    with amp:
        with torch.no_grad():
            teacher_output = run.teacher(images[:2])  # only the 2 global views pass through the teacher
        student_output = run.student(images)
        loss = run.loss(student_output, teacher_output, float(s.teacher_temp[epoch]))
    run.optimizer.zero_grad(set_to_none=True)
    model, scaler = run.student_module, run.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        if c.clip_grad:
            scaler.unscale_(run.optimizer)
            clip_gradients(model, c.clip_grad)
        cancel_gradients_last_layer(epoch, model, c.freeze_last_layer)
        scaler.step(run.optimizer)
        scaler.update()
    else:
        loss.backward()
        if c.clip_grad:
            clip_gradients(model, c.clip_grad)
        cancel_gradients_last_layer(epoch, model, c.freeze_last_layer)
        run.optimizer.step()
    momentum = float(s.momentum[it])
    ema_update(run.teacher.parameters(), model.parameters(), momentum)
    return float(loss.item()), momentum  # .item() synchronises: step timings are real


def _step_stats(run: Run, it: int, epoch: int, loss: float, momentum: float, bad: int, rate: float, step_s: float,
                wait: float) -> StepStats:
    """The log line of step `it` + 1: loss, entropies and bad images averaged over the processes."""
    s = run.loss.last_stats
    packed = torch.tensor([loss, float(s["teacher_entropy"]), float(s["teacher_batch_entropy"]), float(bad)],
                          dtype=torch.float64)
    if run.d.enabled:
        packed = all_reduce_mean(packed.to(run.d.device), run.d).cpu()
    sched = run.schedules
    return StepStats(
        step=it + 1, epoch=epoch, loss=float(packed[0]), lr=float(sched.lr[it]), wd=float(sched.wd[it]),
        momentum=momentum, teacher_temp=float(sched.teacher_temp[epoch]), teacher_entropy=float(packed[1]),
        teacher_batch_entropy=float(packed[2]), images_per_s=rate, step_s=step_s, data_wait=wait,
        bad_images=int(round(float(packed[3]) * run.d.world_size)),
    )


def _record(p: _Progress, stats: StepStats, *, call_back: bool) -> None:
    """A logged step: the log line, the report's losses, the collapse watch, then `on_step` (rank 0; its
    KeyboardInterrupt asks for a stop after this step)."""
    p.log.step(stats)
    if p.report.first_loss is None:
        p.report.first_loss = stats.loss
    p.report.last_loss = stats.loss
    message = p.watch.update(stats.step, stats.teacher_entropy, stats.teacher_batch_entropy)
    if message:
        p.report.warnings.append(message)
        p.log.event("warning", step=stats.step, message=message)
    if p.on_step is not None and call_back:
        try:
            p.on_step(stats)
        except KeyboardInterrupt:
            p.stop.requested = True


def _save(run: Run, p: _Progress, *, snapshot: bool = False) -> None:
    step = p.report.steps
    path = save_checkpoint(run, step, snapshot=snapshot)
    if path is not None:
        p.report.checkpoint = str(path)
        p.log.event("checkpoint", step=step, epoch=step // run.iters_per_epoch, path=str(path))


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
