"""Per-iteration schedules, as in the official DINO: cosine with linear warm-up (lr, weight decay, teacher momentum)
and a per-epoch teacher temperature with linear warm-up."""

from __future__ import annotations

import numpy as np


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per iteration (epochs * niter_per_ep of them): a linear ramp from `start_warmup_value` to
    `base_value` over `warmup_epochs`, then `final + (base - final) * (1 + cos(pi * t / T)) / 2` for the rest.

    Identical to DINO's `utils.cosine_scheduler`, except that a warm-up longer than the run is cut to the run
    (short test runs with the recipe's 10 warm-up epochs), where the original fails an assertion.
    """
    total = int(epochs) * int(niter_per_ep)
    warmup_iters = min(int(warmup_epochs) * int(niter_per_ep), total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """One teacher temperature per epoch: linear from `warmup_temp` to `temp` over `warmup_epochs`
    (np.linspace, both ends included), then `temp`. Same as DINOLoss.teacher_temp_schedule."""
    warmup_epochs = min(int(warmup_epochs), int(epochs))
    return np.concatenate(
        (np.linspace(warmup_temp, temp, warmup_epochs), np.ones(int(epochs) - warmup_epochs) * temp)
    )
