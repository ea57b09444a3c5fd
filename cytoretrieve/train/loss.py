"""DINO's loss: cross-entropy between the centred, sharpened teacher and the student over every pair of
different views, with the centre an EMA of the teacher's mean output (all-reduced across processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """`forward(student_output, teacher_output, teacher_temp)`.

    student_output: (n_views * B, out_dim), views stacked in order (2 global crops first, then local crops);
    teacher_output: (2 * B, out_dim) for the 2 global crops. Returns the mean over the (teacher view q,
    student view v != q) pairs of mean_b sum_k -P_t(q)[b,k] log P_s(v)[b,k], where
    P_t = softmax((t - center) / teacher_temp) and P_s = softmax(s / student_temp); then moves the centre:
    center <- m * center + (1 - m) * mean over the global batch of teacher_output.
    """

    def __init__(self, out_dim: int, n_views: int, *, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.n_views = int(n_views)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        student_output, teacher_output = _at_least_float32(student_output), _at_least_float32(teacher_output)
        student_logp = F.log_softmax(student_output / self.student_temp, dim=-1).chunk(self.n_views)
        teacher_p = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach()
        teacher_chunks = teacher_p.chunk(2)
        total = student_output.new_zeros(())
        n_terms = 0
        for iq, q in enumerate(teacher_chunks):
            for v, logp in enumerate(student_logp):
                if v == iq:  # the same view through both networks is not a pair
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                n_terms += 1
        loss = total / n_terms
        with torch.no_grad():
            self.last_stats = {
                # mean entropy of the teacher's per-image distribution (sharpness) ...
                "teacher_entropy": -(teacher_p * torch.log(teacher_p.clamp_min(1e-30))).sum(-1).mean(),
                # ... and of the batch-mean distribution (how many output dims are used at all)
                "teacher_batch_entropy": _entropy(teacher_p.mean(0)),
            }
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center.copy_(self.center * self.center_momentum + batch_center * (1 - self.center_momentum))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Softmaxes and the centre in float32 under bf16 / fp16 autocast; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum()
