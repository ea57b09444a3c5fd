"""A DINO run built and saved: what main_dino.train_dino sets up before its epoch loop (data, student and
teacher, loss, optimiser, schedules, the restart from a checkpoint) and the checkpoint it writes after each epoch.

`build_run` returns a `Run`, everything the epochs need; `save_checkpoint` writes what `build_run` restores
(weights, optimiser, grad scaler, centre, step, RNG states, arguments, a digest of the data), so a resumed run
continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytoretrieve.distributed import Dist, barrier
from cytoretrieve.errors import CytoError
from cytoretrieve.runtime import default_workers, is_cnn
from cytoretrieve.train import checkpoint as ckpt
from cytoretrieve.train.config import TrainConfig
from cytoretrieve.train.data import Loader, TrainDataset, build_dataset, make_loader
from cytoretrieve.train.head import DINOModel, build_student_teacher
from cytoretrieve.train.loss import DINOLoss
from cytoretrieve.train.optim import build_optimizer, has_batchnorms
from cytoretrieve.train.schedules import cosine_scheduler, teacher_temp_schedule


@dataclass
class Schedules:
    """One value per step (lr, weight decay, teacher momentum) or per epoch (teacher temperature), as DINO's."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def for_run(cls, config: TrainConfig, iters_per_epoch: int) -> Schedules:
        c, ipe = config, iters_per_epoch
        return cls(
            lr=cosine_scheduler(c.lr * c.batch_size / 256.0, c.min_lr, c.epochs, ipe, warmup_epochs=c.warmup_epochs),
            wd=cosine_scheduler(c.weight_decay, c.weight_decay_end, c.epochs, ipe),
            momentum=cosine_scheduler(c.momentum_teacher, 1.0, c.epochs, ipe),
            teacher_temp=teacher_temp_schedule(c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs,
                                               c.epochs),
        )


@dataclass
class Run:
    """Everything a run's epochs use. `student` is what the step calls (DDP-wrapped under torchrun);
    `student_module` the model itself (its parameters, its state dict)."""

    config: TrainConfig
    d: Dist
    out: Path
    dataset: TrainDataset
    held_out: int
    loader: Loader
    workers: int
    per_rank: int
    student: torch.nn.Module
    student_module: DINOModel
    teacher: DINOModel
    loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedules: Schedules
    precision: str
    channels_last: bool
    data_digest: str
    start_step: int = 0
    warnings: list[str] = field(default_factory=list)  # from the restart, for the log

    @property
    def iters_per_epoch(self) -> int:
        return self.loader.sampler.batches

    @property
    def total_steps(self) -> int:
        return self.iters_per_epoch * self.config.epochs

    @property
    def cuda(self) -> bool:
        return self.d.device.startswith("cuda")


def load_state(out: Path, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from (with `resume`); a new run must not overwrite one."""
    last = out / ckpt.LAST
    if last.exists() and not resume:
        raise CytoError(f"{out} already holds a checkpoint: pass `resume` to continue that run, or choose another `out`")
    return ckpt.load(last) if resume else None


def build_run(config: TrainConfig, d: Dist, out: Path, state: dict[str, Any] | None) -> Run:
    """Data, models, loss, optimiser and schedules of the run; restarted from `state` when given."""
    precision = _precision(config, d.device)
    cuda = d.device.startswith("cuda")
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif cuda:
        torch.backends.cudnn.benchmark = True
    dataset, held_out = build_dataset(config)
    if config.batch_size % d.world_size:
        raise CytoError(f"`batch_size` {config.batch_size} does not split evenly over {d.world_size} processes")
    per_rank = config.batch_size // d.world_size
    workers = (default_workers(d.device, processes=d.local_world_size, augments=True) if config.workers is None
               else int(config.workers))
    loader = make_loader(dataset, rank=d.rank, world_size=d.world_size, batch_size=per_rank, seed=config.seed,
                         workers=workers, pin_memory=cuda, worker_init_fn=_ignore_sigint if workers else None)
    if loader.sampler.batches < 1:
        raise CytoError(f"{len(dataset)} training images are too few for a batch of {config.batch_size}: lower `batch_size`")
    student, student_module, teacher, channels_last = _build_models(config, d, state)
    dino_loss = DINOLoss(config.out_dim, 2 + config.local_crops, student_temp=config.student_temp,
                         center_momentum=config.center_momentum).to(d.device)
    run = Run(
        config=config, d=d, out=out, dataset=dataset, held_out=held_out, loader=loader, workers=workers,
        per_rank=per_rank, student=student, student_module=student_module, teacher=teacher, loss=dino_loss,
        optimizer=build_optimizer(config.optimizer, student_module),
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        schedules=Schedules.for_run(config, loader.sampler.batches), precision=precision,
        channels_last=channels_last, data_digest=dataset.source.digest(),
    )
    if state is not None:
        _restore(run, state)
    return run


def _build_models(config: TrainConfig, d: Dist, state: dict[str, Any] | None):  # noqa: ANN202
    """(student as called, student module, teacher, channels_last): seeded init or the checkpoint's weights,
    on the device, SyncBatchNorm under DDP on GPUs, optionally compiled, the student DDP-wrapped."""
    cuda = d.device.startswith("cuda")
    torch.manual_seed(config.seed)
    student, teacher = build_student_teacher(
        config.arch, image_size=config.image_size, out_dim=config.out_dim, hidden_dim=config.hidden_dim,
        bottleneck_dim=config.bottleneck_dim, nlayers=config.head_layers, use_bn_in_head=config.use_bn_in_head,
        norm_last_layer=config.norm_last_layer, drop_path_rate=config.drop_path,
    )
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
    channels_last = cuda and is_cnn(student.backbone)
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
    return student, student_module, teacher, channels_last


def _restore(run: Run, state: dict[str, Any]) -> None:
    """The optimiser, grad scaler, centre, step and RNG states of the checkpoint (the weights are loaded
    with the models); the same training data is required."""
    if state.get("data", {}).get("digest") != run.data_digest:
        raise CytoError(
            f"the training data changed since the checkpoint ({state.get('data', {}).get('images')} images"
            f" then, {len(run.dataset)} now): resuming needs the same images"
        )
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.loss.center.copy_(state["center"].to(run.d.device))
    run.start_step = int(state["step"])
    ckpt.set_rng_state(state["rng"])
    if int(state.get("world_size", 1)) != run.d.world_size:
        run.warnings.append(f"resuming with {run.d.world_size} processes instead of {state.get('world_size')}:"
                            " the continuation is valid but not bit-identical")


def save_checkpoint(run: Run, step: int, *, snapshot: bool = False) -> Path | None:
    """Write `out`/checkpoint.pth (and checkpoint_eNNNN.pth with `snapshot`) on rank 0, then wait for every
    rank; the path on rank 0, None on the others."""
    path = None
    if run.d.is_main:
        ipe = run.iters_per_epoch
        payload = {
            "student": run.student_module.state_dict(),
            "teacher": run.teacher.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "center": run.loss.center.detach().cpu().clone(),
            "epoch": step // ipe,
            "step": step,
            "iters_per_epoch": ipe,
            "world_size": run.d.world_size,
            "args": run.config.to_dict(),
            "rng": ckpt.rng_state(),
            "data": {"images": len(run.dataset), "digest": run.data_digest},
        }
        path = run.out / ckpt.LAST
        ckpt.save(payload, path)
        if snapshot:
            ckpt.save(payload, run.out / f"checkpoint_e{step // ipe:04d}.pth")
    barrier()
    return path


def _precision(config: TrainConfig, device: str) -> str:
    cuda = device.startswith("cuda")
    if config.precision == "auto":
        return "bf16" if cuda else "fp32"
    if config.precision == "fp16" and not cuda:
        raise CytoError("`precision` fp16 needs a CUDA GPU: use fp32 (or bf16) on a CPU")
    return config.precision


def _ignore_sigint(_: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops cleanly after the step."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
