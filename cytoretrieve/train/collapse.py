"""The collapse warning, on the signatures DINO's authors describe (Caron et al. 2021, sec. 5.3 and fig. 7).

Centring and sharpening balance each other; when one wins, the teacher's output collapses:
- uniform: centring wins, every image gets a flat distribution, the teacher's per-image entropy sits at its
  maximum ln(out_dim);
- one dimension dominates: sharpening wins, every image lands on the same output dimension, the entropy of the
  teacher's batch-mean (centred) distribution sits near 0.

Neither is judged during warm-up (learning-rate warm-up, frozen last layer): a healthy run starts with near-uniform
outputs and a loss at ln(out_dim), and a warning there was a false alarm (issue 14). The loss itself is not
used: it sits at ln(out_dim) early in every run.
"""

from __future__ import annotations

import math
from collections import deque


class CollapseWatch:
    """`update(step, teacher_entropy, teacher_batch_entropy)` -> a warning (once per kind) when, over the last
    `window` logged steps after `after_step`, the mean per-image entropy is within `tol` x ln(out_dim) of
    ln(out_dim), or the mean batch-mean entropy is within `tol` x ln(out_dim) of 0."""

    def __init__(self, out_dim: int, *, after_step: int, window: int = 50, tol: float = 0.02) -> None:
        self.max_entropy = math.log(out_dim)
        self.after_step, self.margin = after_step, tol * self.max_entropy
        self.image: deque[float] = deque(maxlen=max(1, window))
        self.batch: deque[float] = deque(maxlen=max(1, window))
        self.warned: set[str] = set()

    @property
    def judging(self) -> bool:
        """Whether the window is full of post-warm-up steps (so a healthy run is known to have been judged)."""
        return len(self.image) == self.image.maxlen

    def update(self, step: int, teacher_entropy: float, teacher_batch_entropy: float) -> str | None:
        if step <= self.after_step:
            return None
        self.image.append(teacher_entropy)
        self.batch.append(teacher_batch_entropy)
        if not self.judging:
            return None
        image, batch = _mean(self.image), _mean(self.batch)
        n, ln_k = len(self.image), self.max_entropy
        if image >= ln_k - self.margin and "uniform" not in self.warned:
            self.warned.add("uniform")
            return (f"possible collapse to uniform outputs: the teacher's per-image entropy has sat at ln(out_dim) ="
                    f" {ln_k:.3f} for the last {n} logged steps (mean {image:.3f}, step {step}); try a lower"
                    " `teacher_temp`, a higher `momentum_teacher`, or check the data")
        if batch <= self.margin and "dominant" not in self.warned:
            self.warned.add("dominant")
            return (f"possible collapse to one dimension: the entropy of the teacher's batch-mean distribution has"
                    f" sat near 0 for the last {n} logged steps (mean {batch:.3f} of at most {ln_k:.3f}, step {step}):"
                    " every image lands on the same output; try a lower `center_momentum` or a higher `teacher_temp`")
        return None


def _mean(values: deque[float]) -> float:
    return sum(values) / len(values)
