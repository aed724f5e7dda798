"""The JAX twins of the built-in ``digits``, ``lm`` and ``tiny-gradients`` pipelines.

``twin(p)`` turns a built torch :class:`hwport.pipeline.Pipeline` into a
:class:`JaxPipeline`: the same program written in JAX. It trains on the very same batches
(the torch pipeline's ``batches(seed)``, converted to numpy), starts from the same weights
(the torch model's initial ``state_dict``, so ``torch.manual_seed`` decides both), computes
the same architecture, loss and metrics on the same fixed evaluation set, and steps with
the same optimizer (:class:`AdamW` or :class:`SGD`, torch's algorithms in the order torch
computes them). In
fp32 the two agree to rounding, which is what makes a JAX program emulated with
``hwport.jax.emulate`` comparable with the torch engine's run of its twin.

The JAX functions use ``jax.named_scope("normalization")`` around every layer norm and
``jax.named_scope("loss")`` around the cross entropy, and ``jax.nn.softmax`` /
``jax.nn.log_softmax``, so that a recipe's fp32 groups (``normalization``, ``loss``,
``softmax``) find them, as the torch engine finds the corresponding aten ops.

The fixed evaluation set is read from the torch pipeline through its public functions:
``predict`` and ``evaluate`` are called once with a stand-in model that records its input,
and the targets are the ``target`` of the ``F.cross_entropy`` call that ``evaluate`` makes
(seen through a ``TorchFunctionMode``). So a pipeline built with any options (an ``lm``
trained on another corpus, say) gets a twin with its own data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hwport.errors import HwportError
from hwport.pipeline import Pipeline

__all__ = ["SGD", "AdamW", "JaxPipeline", "Optimizer", "twin"]

Params = dict[str, Any]


def _keep(*args: Any) -> Any:
    """A write that stores the exact result (the last argument): native fp32."""
    return args[-1]


Write = Callable[[str, Any, Any], Any]  # (parameter name, old value, exact new) -> stored


@dataclass(frozen=True)
class AdamW:
    """torch.optim.AdamW's algorithm (single-tensor, ``foreach=False``, no amsgrad), as pure
    functions on pytrees; the defaults are torch's (``torch.optim.Adam`` is this with
    ``weight_decay=0``).

    One step with gradient ``g`` at step ``t`` (counted from 1) does, per tensor, in fp32
    and in torch's order of operations::

        p = p * (1 - lr * weight_decay)                 # decoupled weight decay, first
        m = m + (1 - b1) * (g - m)                      # torch's lerp_(g, 1 - b1)
        v = v * b2 + (1 - b2) * g * g                   # mul_(b2).addcmul_(g, g, 1 - b2)
        denom = sqrt(v) / sqrt(1 - b2**t) + eps
        p = p + (-lr / (1 - b1**t)) * m / denom         # addcdiv_(m, denom, -step_size)

    Weight decay applies to every parameter, as in torch's default parameter group. The
    bias corrections ``1 - b**t`` are computed as ``-expm1(t * log(b))`` (torch computes
    them in float64 from a Python step count; ``1 - b**t`` in fp32 would lose up to 1e-5
    of ``1 - b2``'s relative accuracy, this keeps them within a few fp32 ulps).
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def init_state(self, params: Any) -> dict[str, Any]:
        """The state before the first step: ``step`` 0 (an int32 scalar) and first and
        second moments ``m``, ``v`` of zeros shaped like ``params``."""
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return {"step": jnp.zeros((), jnp.int32), "m": zeros,
                "v": jax.tree_util.tree_map(jnp.copy, zeros)}

    def apply(self, params: dict[str, Any], grads: dict[str, Any], state: dict[str, Any],
              lr: Any, write: Write = _keep, store: Callable[[Any], Any] = _keep
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One step at learning rate ``lr``, parameters in sorted name order: each write
        of a parameter is ``write(name, old, exact)``'s value, each write of the state
        (and each other result, as the torch engine rounds them) ``store(x)``'s."""
        b1, b2 = self.betas
        step = state["step"] + 1
        t = step.astype(jnp.float32)
        bc1 = -jnp.expm1(t * np.float32(math.log(b1)))
        bc2 = -jnp.expm1(t * np.float32(math.log(b2)))
        step_size = lr / bc1
        new: dict[str, Any] = {"step": step, "m": {}, "v": {}}
        out = {}
        for k in sorted(params):
            p, g, m, v = params[k], grads[k], state["m"][k], state["v"][k]
            if self.weight_decay:
                p = write(k, p, p * (1 - lr * self.weight_decay))
            m = store(m + (1 - b1) * (g - m))  # lerp_(grad, 1 - beta1)
            v = store(store(v * b2) + (1 - b2) * g * g)  # mul_(beta2).addcmul_(g, g)
            denom = store(store(store(jnp.sqrt(v)) / jnp.sqrt(bc2)) + self.eps)
            out[k] = write(k, p, p + (-step_size) * m / denom)  # addcdiv_(m, denom, -step)
            new["m"][k], new["v"][k] = m, v
        return out, new

    def update(self, grads: Any, state: dict[str, Any],
               params: Any) -> tuple[Any, dict[str, Any]]:
        """One AdamW step in fp32: ``(new_params, new_state)`` from the gradients of
        ``params``; pure, so it can be jitted with the loss."""
        return self.apply(params, grads, state, self.lr)


@dataclass(frozen=True)
class SGD:
    """torch.optim.SGD without momentum or weight decay (single-tensor):
    ``p = p + (-lr) * g`` (``add_(grad, alpha=-lr)``), one write per parameter."""

    lr: float

    def init_state(self, params: Any) -> dict[str, Any]:
        """The state before the first step: only the step count."""
        return {"step": jnp.zeros((), jnp.int32)}

    def apply(self, params: dict[str, Any], grads: dict[str, Any], state: dict[str, Any],
              lr: Any, write: Write = _keep, store: Callable[[Any], Any] = _keep
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One step at learning rate ``lr`` (see :meth:`AdamW.apply`)."""
        out = {k: write(k, params[k], params[k] + (-lr) * grads[k]) for k in sorted(params)}
        return out, {"step": state["step"] + 1}

    def update(self, grads: Any, state: dict[str, Any],
               params: Any) -> tuple[Any, dict[str, Any]]:
        """One SGD step in fp32."""
        return self.apply(params, grads, state, self.lr)


Optimizer = AdamW | SGD


@dataclass
class JaxPipeline:
    """A training + inference program in JAX, the twin of a torch hwport.Pipeline: the same
    data (the very same batches), the same architecture, the same initial weights, the
    same optimizer and metrics, written in JAX.

    ``init()`` returns the torch model's initial ``state_dict`` as float32 numpy arrays keyed
    by its names; it calls the torch pipeline's ``model()``, so it draws from torch's global
    generator as building the torch model does (seed torch first to get the same weights as
    a torch model built under that seed). ``loss(params, batch)`` is the mean loss of a batch (a
    tuple of arrays, as ``batches`` yields them), ``evaluate(params)`` the validation
    metrics (``val_loss`` and the torch pipeline's metrics, as jnp scalars, usable under
    ``jax.jit``): ``measure(outputs(params))``, the model's outputs on the evaluation set
    and the metrics of those outputs. ``predict(params)`` gives the logits on the fixed
    evaluation set. ``params`` is any mapping of those names to arrays (numpy or jnp).
    """

    name: str
    torch: Pipeline
    init: Callable[[], dict[str, np.ndarray]]
    loss: Callable[[Any, Any], jax.Array]
    outputs: Callable[[Any], Any]
    measure: Callable[[Any], dict[str, jax.Array]]
    predict: Callable[[Any], jax.Array]
    batches: Callable[[int], Iterator[tuple[np.ndarray, ...]]]
    optimizer: Optimizer
    metric: str
    steps: int
    eval_every: int

    def evaluate(self, params: Any) -> dict[str, jax.Array]:
        """The validation metrics: :attr:`measure` of the model's :attr:`outputs` on the
        evaluation set (an engine emulates the model alone, as the torch engine emulates
        only the model's forward when a pipeline evaluates)."""
        return self.measure(self.outputs(params))


# ---- building blocks, mirroring torch.nn's ----------------------------------------------

def linear(params: Params, name: str, x: Any) -> Any:
    """torch.nn.Linear: ``x @ W.T + b`` with ``W`` of shape [out, in]."""
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def layer_norm(params: Params, name: str, x: Any, eps: float = 1e-5) -> Any:
    """torch.nn.LayerNorm over the last axis (biased variance, two passes), with its weight
    and bias; under the ``normalization`` scope."""
    with jax.named_scope("normalization"):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        return (centred * jax.lax.rsqrt(var + eps) * params[f"{name}.weight"]
                + params[f"{name}.bias"])


def mse(pred: Any, targets: Any) -> jax.Array:
    """F.mse_loss with mean reduction; under the ``loss`` scope."""
    with jax.named_scope("loss"):
        out: jax.Array = jnp.mean(jnp.square(pred - targets))
        return out


def cross_entropy(logits: Any, targets: Any) -> jax.Array:
    """F.cross_entropy with mean reduction: ``logits`` [..., classes], integer ``targets``
    [...]; under the ``loss`` scope."""
    with jax.named_scope("loss"):
        classes = logits.shape[-1]
        logp = jax.nn.log_softmax(jnp.reshape(logits, (-1, classes)), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.reshape(targets, (-1, 1)), axis=-1)
        out: jax.Array = -jnp.mean(picked)
        return out


# ---- the evaluation set, read from the torch pipeline ------------------------------------

class _LossTargets(TorchFunctionMode):
    """Records the ``target`` of every ``F.cross_entropy`` and ``F.mse_loss`` call made
    while active."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy or func is F.mse_loss:
            self.targets.append(args[1] if len(args) > 1 else kwargs["target"])
        return func(*args, **kwargs)


def _evaluation_set(p: Pipeline, classes: int,
                    shape: Callable[[tuple[int, ...]], tuple[int, ...]],
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(evaluate's inputs, evaluate's targets, predict's inputs) of the torch pipeline ``p``,
    found by running them on a stand-in model that records its input and returns zero
    outputs of ``shape(input shape) + (classes,)``."""
    seen: list[torch.Tensor] = []

    def stand_in(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return torch.zeros((*shape(tuple(x.shape)), classes))

    with torch.no_grad():
        mode = _LossTargets()
        with mode:
            p.evaluate(stand_in)
        p.predict(stand_in)
    if len(seen) != 2 or len(mode.targets) != 1:
        raise HwportError(f"pipeline {p.name!r}: cannot read its evaluation set (expected "
                          "evaluate to call the model once and its loss (F.cross_entropy "
                          "or F.mse_loss) once, and predict to call the model once)")
    return (seen[0].numpy(), mode.targets[0].detach().numpy().copy(), seen[1].numpy())


Metrics = Callable[[jax.Array, Any, Any], dict[str, jax.Array]]


def _common(p: Pipeline, name: str, forward: Callable[[Params, Any], Any], classes: int,
            shape: Callable[[tuple[int, ...]], tuple[int, ...]], metrics: Metrics,
            optimizer: Optimizer, criterion: Callable[[Any, Any], jax.Array] = cross_entropy,
            loss_weight: float = 1.0) -> JaxPipeline:
    """A twin from its forward pass: ``criterion`` (mean cross entropy or squared error)
    is the validation loss, and times ``loss_weight`` the training loss."""
    ex, ey, px = _evaluation_set(p, classes, shape)
    if criterion is cross_entropy:
        ey = ey.reshape(shape(ex.shape))

    def init() -> dict[str, np.ndarray]:
        model = p.model()
        return {k: v.detach().cpu().numpy().astype(np.float32, copy=True)
                for k, v in model.state_dict().items()}

    def loss(params: Params, batch: Any) -> jax.Array:
        value = criterion(forward(params, batch[0]), batch[1])
        return value * loss_weight if loss_weight != 1.0 else value

    def outputs(params: Params) -> Any:
        return forward(params, ex)

    def measure(out: Any) -> dict[str, jax.Array]:
        val_loss = criterion(out, ey)
        return {"val_loss": val_loss, **metrics(val_loss, out, ey)}

    def batches(seed: int) -> Iterator[tuple[np.ndarray, ...]]:
        for batch in p.batches(seed):
            yield tuple(t.detach().cpu().numpy() for t in batch)

    return JaxPipeline(
        name=name, torch=p, init=init, loss=loss, outputs=outputs, measure=measure,
        predict=lambda params: forward(params, px), batches=batches, optimizer=optimizer,
        metric=p.metric, steps=p.steps, eval_every=p.eval_every)


# ---- the twins ------------------------------------------------------------------------

def _digits(p: Pipeline) -> JaxPipeline:
    lr = float(p.config["lr"])
    optimizer: Optimizer = SGD(lr) if p.config.get("optimizer") == "sgd" else AdamW(lr)

    def forward(params: Params, x: Any) -> Any:
        h = jax.nn.relu(linear(params, "0", x))
        h = jax.nn.relu(linear(params, "2", h))
        return linear(params, "4", h)

    def metrics(val_loss: jax.Array, logits: Any, y: Any) -> dict[str, jax.Array]:
        hits = jnp.argmax(logits, axis=-1) == jnp.asarray(y)
        return {"accuracy": jnp.mean(hits.astype(jnp.float32))}

    return _common(p, "digits", forward, 10, lambda s: s[:-1], metrics, optimizer)


def _lm(p: Pipeline) -> JaxPipeline:
    heads, layers = int(p.config["heads"]), int(p.config["layers"])

    def block(params: Params, pre: str, x: Any) -> Any:
        b, t, d = x.shape
        hd = d // heads
        q, k, v = jnp.split(linear(params, pre + "qkv", layer_norm(params, pre + "ln1", x)),
                            3, axis=-1)
        q, k, v = (jnp.transpose(jnp.reshape(z, (b, t, heads, hd)), (0, 2, 1, 3))
                   for z in (q, k, v))
        att = (q @ jnp.swapaxes(k, -2, -1)) * (1.0 / math.sqrt(hd))
        mask = np.triu(np.ones((t, t), dtype=bool), 1)
        att = jax.nn.softmax(jnp.where(mask, -jnp.inf, att), axis=-1)
        y = jnp.reshape(jnp.transpose(att @ v, (0, 2, 1, 3)), (b, t, d))
        x = x + linear(params, pre + "proj", y)
        hidden = jax.nn.gelu(linear(params, pre + "fc", layer_norm(params, pre + "ln2", x)),
                             approximate=False)
        return x + linear(params, pre + "out", hidden)

    def forward(params: Params, idx: Any) -> Any:
        idx = jnp.asarray(idx)
        x = params["tok.weight"][idx] + params["pos.weight"][: idx.shape[1]]
        for i in range(layers):
            x = block(params, f"blocks.{i}.", x)
        return linear(params, "head", layer_norm(params, "ln", x))

    def metrics(val_loss: jax.Array, logits: Any, y: Any) -> dict[str, jax.Array]:
        return {"perplexity": jnp.where(val_loss < 700, jnp.exp(val_loss), jnp.inf)}

    return _common(p, "lm", forward, 256, lambda s: s, metrics,
                   AdamW(lr=float(p.config["lr"])))


def _tiny_gradients(p: Pipeline) -> JaxPipeline:
    """Least squares, the loss weighted by ``loss_weight``; Adam with torch's settings
    (AdamW without weight decay, epsilon 1e-30)."""
    def forward(params: Params, x: Any) -> Any:
        return x @ params["weight"].T

    return _common(p, "tiny-gradients", forward, 1, lambda s: s[:-1], lambda *_: {},
                   AdamW(lr=float(p.config["lr"]), eps=1e-30, weight_decay=0.0),
                   criterion=mse, loss_weight=float(p.config["loss_weight"]))


TWINS: dict[str, Callable[[Pipeline], JaxPipeline]] = {
    "digits": _digits, "lm": _lm, "tiny-gradients": _tiny_gradients}


def twin(p: Pipeline) -> JaxPipeline:
    """The JAX twin of a built torch pipeline named ``digits``, ``lm`` or
    ``tiny-gradients``; any other raises HwportError naming the pipeline."""
    make = TWINS.get(p.name)
    if make is None:
        raise HwportError(f"pipeline {p.name!r} has no JAX twin; twins exist for "
                          f"{', '.join(TWINS)}")
    return make(p)
