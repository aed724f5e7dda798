"""The pipeline interface: an ordinary torch training program, described to hwport.

A :class:`Pipeline` is what hwport needs to run *your* training loop under any backend:
how to build the model and the optimizer, the training batches, the loss of a batch, the
validation metrics and the model's outputs on a fixed evaluation set. None of it knows
about backends: hwport runs the same functions natively (reference) and emulated.

Wrap an existing program in a few lines::

    def my_pipeline(steps: int = 300) -> hwport.Pipeline:
        return hwport.Pipeline(
            name="mine",
            model=lambda: MyNet(),
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
            batches=lambda seed: my_loader(seed),          # an iterator of batches
            loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
            evaluate=lambda model: {"val_loss": ..., "accuracy": ...},
            predict=lambda model: model(fixed_inputs),     # logits, for output agreement
            metric="accuracy",
            steps=steps,
        )

and run it with ``hwport run --pipeline mypackage.mymodule:my_pipeline`` or register it
through the ``hwport_pipelines`` hook. The built-in pipelines use this interface too.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hwport.errors import HwportError


@dataclass
class Pipeline:
    """A training + inference program (see the module docstring).

    ``evaluate`` returns validation metrics and must include ``val_loss``; ``metric`` names
    the headline metric among them (shown in tables; outcomes are judged on ``val_loss``).
    ``predict`` returns logits on a fixed evaluation set, compared across backends in infer
    mode.
    ``config`` is what identifies the program's configuration (it keys cached models).
    """

    name: str
    model: Callable[[], Any]
    optimizer: Callable[[Iterable[Any]], Any]
    batches: Callable[[int], Iterator[Any]]
    loss: Callable[[Any, Any], Any]
    evaluate: Callable[[Any], dict[str, float]]
    predict: Callable[[Any], Any]
    metric: str = "val_loss"
    steps: int = 200
    eval_every: int = 50
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise HwportError(f"pipeline {self.name!r}: steps={self.steps!r} must be a "
                              "positive integer")
        if self.eval_every < 1:
            raise HwportError(f"pipeline {self.name!r}: eval_every must be >= 1")

    def key(self) -> str:
        """A short hash of the name and configuration, for caches."""
        blob = json.dumps({"name": self.name, "steps": self.steps, **self.config},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PipelineFactory:
    """A registered pipeline: a name and a function that builds it from options."""

    name: str
    description: str
    build: Callable[..., Pipeline]


def check_options(name: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise a clear error unless ``fn`` accepts ``options`` as keyword arguments."""
    try:
        inspect.signature(fn).bind(**options)
    except TypeError as e:
        raise HwportError(f"pipeline {name!r} does not take these options {sorted(options)}: "
                          f"{e}") from None


def load_factory(ref: str) -> PipelineFactory:
    """``package.module:function`` as a pipeline factory."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise HwportError(f"pipeline reference {ref!r}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any failure of the user's module, reported where it happened
        raise HwportError(f"pipeline reference {ref!r}: importing {module_name!r} failed: "
                          f"{type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise HwportError(f"pipeline reference {ref!r}: {module_name} has no callable {attr!r}")
    return PipelineFactory(ref, (fn.__doc__ or "").strip().split("\n")[0], fn)
