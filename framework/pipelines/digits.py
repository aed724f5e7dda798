"""digits: a small MLP classifier on scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwport.errors import HwportError
from hwport.pipeline import Pipeline


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits scikit-learn ships (``sklearn.datasets.load_digits``'s file), read
    without importing scikit-learn, which takes seconds."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise HwportError("the digits pipeline needs scikit-learn's bundled data: "
                          "pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1], table[:, -1].astype(np.int64)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = load_digits()
    x = torch.from_numpy(images) / 16.0
    y = torch.from_numpy(labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


OPTIMIZERS = ("adamw", "sgd")


def pipeline(steps: int = 300, batch_size: int = 64, hidden: int = 128, lr: float = 2e-3,
             optimizer: str = "adamw") -> Pipeline:
    """An MLP (64-hidden-hidden-10) trained with AdamW (or plain SGD, ``optimizer="sgd"``);
    headline metric: accuracy."""
    if optimizer not in OPTIMIZERS:
        raise HwportError(f"digits: optimizer={optimizer!r} must be one of {list(OPTIMIZERS)}")
    if not 1 <= batch_size <= 1500:
        raise HwportError(f"digits: batch_size={batch_size} must be within 1..1500 (the "
                          "training set's size)")
    xt, yt, xv, yv = _data()

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                             nn.ReLU(), nn.Linear(hidden, 10))

    def batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, len(yt), (batch_size,), generator=g)
            yield xt[idx], yt[idx]

    def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    def evaluate(m: nn.Module) -> dict[str, float]:
        logits = m(xv)
        return {"val_loss": float(F.cross_entropy(logits, yv)),
                "accuracy": float((logits.argmax(-1) == yv).float().mean())}

    def make_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, foreach=False)
        return torch.optim.AdamW(params, lr=lr, foreach=False)

    return Pipeline(
        name="digits", model=model, optimizer=make_optimizer,
        batches=batches, loss=loss, evaluate=evaluate, predict=lambda m: m(xv),
        metric="accuracy", steps=steps, eval_every=max(steps // 6, 1),
        config={"batch_size": batch_size, "hidden": hidden, "lr": lr, "optimizer": optimizer},
    )
