"""Adam's per-element preconditioning of a gradient, as a step direction.

Used where an attack optimises pixels by hand (feature matching's forward step,
input-space Gradient Canceling): the caller keeps its own step size, schedule,
proximal step and clipping, and replaces the raw gradient by Adam's
bias-corrected m1 / sqrt(m2) (beta1 0.9, beta2 0.999). Each element has its own
moments, so the result does not depend on how poisons are batched.
"""

from __future__ import annotations

import torch


class AdamDirection:
    def __init__(self) -> None:
        self.m1: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.k = 0

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        if self.m1 is None:
            self.m1, self.m2 = torch.zeros_like(g), torch.zeros_like(g)
        self.k += 1
        self.m1.mul_(0.9).add_(g, alpha=0.1)
        self.m2.mul_(0.999).addcmul_(g, g, value=0.001)
        return (self.m1 / (1 - 0.9 ** self.k)) / ((self.m2 / (1 - 0.999 ** self.k)).sqrt() + 1e-12)
