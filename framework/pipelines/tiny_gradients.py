"""tiny-gradients: least squares whose gradients lie below fp16's smallest subnormal."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hwport.errors import HwportError
from hwport.pipeline import Pipeline


def pipeline(steps: int = 60, loss_weight: float = 2.0**-30, features: int = 8,
             lr: float = 0.05) -> Pipeline:
    """A linear least-squares fit whose loss carries a small weight (a term of a weighted
    multi-task loss, or a mean over very many elements): with the default 2**-30 every
    gradient lies far below fp16's smallest subnormal 2**-24, yet Adam, whose update does
    not depend on the gradient's scale (its epsilon is set far below the gradients), fits
    it in fp32. Headline metric: the unweighted validation loss."""
    if not loss_weight > 0:
        raise HwportError(f"tiny-gradients: loss_weight={loss_weight!r} must be positive")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(features, 1, generator=g)
    x, xv = torch.randn(256, features, generator=g), torch.randn(256, features, generator=g)
    y, yv = x @ w, xv @ w

    def batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield x, y

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"val_loss": float(F.mse_loss(m(xv), yv))}

    return Pipeline(name="tiny-gradients", model=lambda: nn.Linear(features, 1, bias=False),
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=lr, eps=1e-30), batches=batches,
                    loss=lambda m, b: F.mse_loss(m(b[0]), b[1]) * loss_weight,
                    evaluate=evaluate, predict=lambda m: m(xv), steps=steps,
                    eval_every=max(steps // 4, 1),
                    config={"loss_weight": loss_weight, "features": features, "lr": lr})
