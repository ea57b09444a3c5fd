"""Where a job runs: the device it asks for, how many DataLoader workers it gets, whether a model wants
channels_last. Shared by embedding, DINO training and MIL scoring, so the three decide these the same way.

torch is imported inside the functions: `queries/` imports this module, and importing it must stay cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cytoretrieve.errors import CytoError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is available, else "cpu"; an unavailable or unknown device is a CytoError."""
    import torch

    device = (device or "auto").strip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise CytoError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from e
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CytoError(f"device {device!r} requested but no CUDA GPU is available: use `device` cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CytoError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise CytoError(f"device {device!r} requested but MPS is not available: use `device` cpu or auto")
    elif parsed.type != "cpu":
        raise CytoError(f"unsupported device {device!r}: use auto, cpu or cuda[:N]")
    return device


def is_cnn(model: torch.nn.Module) -> bool:
    """CNNs gain from channels_last; a ViT has a single conv (its patch embedding)."""
    import torch

    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def default_workers(device: str, *, processes: int = 1, augments: bool = False) -> int:
    """DataLoader workers per process when none are asked for, from this process's share of the cores
    (`processes` is how many share this machine: torchrun's LOCAL_WORLD_SIZE).

    Embedding (`augments` False) decodes cheaply next to the forward pass: half the share (at most 8) on a GPU
    or a large CPU, and none for a CPU run on <= 2 cores, where a worker only adds its start-up (~3 s: a fresh
    interpreter importing torch) and competes with torch's threads (~2 ms to prepare an image in-process next to
    ~30 ms of resnet18 forward). Training (`augments` True) makes every DINO view of every image, the GPU's
    bottleneck: all the share but one on a GPU (at most 12); on a CPU the cores are needed for the model, so one
    worker, whose augmentations overlap the step.
    """
    cores = max(1, (os.cpu_count() or 2) // max(1, processes))
    cuda = device.startswith("cuda")
    if augments:
        if cuda:
            return max(1, min(12, cores - 1))
        return 1 if cores >= 2 else 0
    if not cuda and cores <= 2:
        return 0
    return min(8, max(1, cores // 2))
