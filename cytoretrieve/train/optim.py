"""Optimisation pieces of the official DINO: parameter groups (no weight decay on biases and norm parameters),
per-parameter gradient clipping, freezing the last layer during the first epoch(s), and the teacher's EMA."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cytoretrieve.errors import CytoError

OPTIMIZERS = ("adamw", "sgd")


def get_params_groups(model: nn.Module) -> list[dict]:
    """[regularised, not regularised (weight_decay 0)]: biases and every 1-d parameter (norm layers) are not
    decayed; frozen parameters are left out. The schedule sets group 0's weight decay each step."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (ViTs) or SGD with momentum 0.9 (ResNets), on DINO's parameter groups; lr and wd come from the
    schedules at every step."""
    groups = get_params_groups(model)
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    raise CytoError(f"unknown optimizer {name!r}: use {' or '.join(OPTIMIZERS)}")


def has_batchnorms(model: nn.Module) -> bool:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) for m in model.modules())


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """DINO's clipping: each parameter's gradient is scaled to norm <= clip on its own (not the global norm):
    g *= clip / (||g|| + 1e-6) when that factor is < 1. Returns the gradient norms before clipping (no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads, 2)
    coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)
    return torch.stack(norms)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """During the first `freeze_last_layer` epochs the head's last layer gets no update (its grads are dropped)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def ema_update(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter (buffers are the teacher's own)."""
    t = [p.data for p in teacher]
    s = [p.detach().data for p in student]
    if len(t) != len(s):
        raise RuntimeError(f"teacher has {len(t)} parameters, student {len(s)}")
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)
