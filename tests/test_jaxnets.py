"""hwport.pipelines.jaxnets: the JAX twins of the built-in pipelines agree with torch in fp32."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("jax")

import jax
import jax.numpy as jnp

from hwport.errors import HwportError
from hwport.pipeline import Pipeline
from hwport.pipelines.jaxnets import SGD, AdamW, JaxPipeline, twin
from hwport.runner import resolve_pipeline

SMALL_LM = {"steps": 3, "d_model": 32, "layers": 1, "context": 16, "batch_size": 4,
            "eval_windows": 4}


OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "digits": ("digits", {}), "lm": ("lm", SMALL_LM), "tiny-gradients": ("tiny-gradients", {}),
    "digits-sgd": ("digits", {"optimizer": "sgd"})}


@pytest.fixture(scope="module", params=list(OPTIONS))
def built(request: pytest.FixtureRequest) -> tuple[Pipeline, JaxPipeline]:
    name, options = OPTIONS[request.param]
    p = resolve_pipeline(name, options=options)
    return p, twin(p)


def pair(p: Pipeline, tw: JaxPipeline) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    """The torch model and the twin's params, both built under torch seed 0."""
    torch.manual_seed(0)
    model = p.model()
    torch.manual_seed(0)
    return model, tw.init()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def test_twin_agrees_with_torch(built: tuple[Pipeline, JaxPipeline]) -> None:
    p, tw = built
    model, params = pair(p, tw)
    assert list(params) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert params[k].dtype == np.float32
        np.testing.assert_array_equal(params[k], v.numpy())
    assert (tw.metric, tw.steps, tw.eval_every) == (p.metric, p.steps, p.eval_every)
    want = {"digits": AdamW(lr=p.config["lr"]), "lm": AdamW(lr=p.config["lr"]),
            "tiny-gradients": AdamW(lr=p.config["lr"], eps=1e-30, weight_decay=0.0)}
    assert tw.optimizer == (SGD(p.config["lr"]) if p.config.get("optimizer") == "sgd"
                            else want[p.name])

    for tb, nb in itertools.islice(zip(p.batches(3), tw.batches(3), strict=True), 2):
        assert all(isinstance(a, np.ndarray) for a in nb)
        for a, b in zip(tb, nb, strict=True):
            np.testing.assert_array_equal(a.numpy(), b)

    batch = next(p.batches(0))
    with torch.no_grad():
        torch_loss = p.loss(model, batch).item()
        torch_metrics = p.evaluate(model)
        torch_logits = p.predict(model).numpy()
    assert rel(float(jax.jit(tw.loss)(params, next(tw.batches(0)))), torch_loss) < 1e-5
    metrics = jax.jit(tw.evaluate)(params)
    assert sorted(metrics) == sorted(torch_metrics)
    for k, v in torch_metrics.items():
        assert rel(float(metrics[k]), v) < 1e-5, (k, float(metrics[k]), v)
    logits = np.asarray(jax.jit(tw.predict)(params))
    assert logits.shape == torch_logits.shape
    np.testing.assert_allclose(logits, torch_logits, rtol=0, atol=1e-4)


def test_optimizer_steps_match_torch(built: tuple[Pipeline, JaxPipeline]) -> None:
    """The twin's gradients are torch's (to fp32 rounding); fed torch's gradients, the
    twin's optimizer steps (the first and two more, where Adam's bias corrections differ)
    match the torch pipeline's own optimizer (AdamW, Adam or SGD)."""
    p, tw = built
    model, params = pair(p, tw)
    opt = p.optimizer(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    state = tw.optimizer.init_state(params)
    assert int(state["step"]) == 0 and state["step"].dtype == jnp.int32
    update = jax.jit(tw.optimizer.update)
    jparams: Any = params
    for i, (tb, nb) in enumerate(itertools.islice(zip(p.batches(0), tw.batches(0),
                                                      strict=True), 3)):
        opt.zero_grad()
        p.loss(model, tb).backward()
        grads = {n: q.grad.numpy().copy() for n, q in model.named_parameters()
                 if q.grad is not None}
        if i == 0:
            jgrads = jax.jit(jax.grad(tw.loss))(jparams, nb)
            for n in names:
                scale = float(np.abs(grads[n]).max()) + 1e-12
                np.testing.assert_allclose(np.asarray(jgrads[n]) / scale, grads[n] / scale,
                                           rtol=0, atol=1e-4, err_msg=n)
        opt.step()
        jparams, state = update(grads, state, jparams)
        # relative 1e-6, or 1e-6 of a step (lr) / of the gradient where values cancel to ~0
        for n, q in model.named_parameters():
            np.testing.assert_allclose(np.asarray(jparams[n]), q.detach().numpy(), rtol=1e-6,
                                       atol=1e-6 * p.config["lr"], err_msg=f"step {i + 1}: {n}")
            torch_state = opt.state[q]
            if isinstance(tw.optimizer, SGD):
                assert set(state) == {"step"} and not torch_state
                continue
            np.testing.assert_allclose(np.asarray(state["m"][n]),
                                       torch_state["exp_avg"].numpy(), rtol=1e-6,
                                       atol=1e-6 * float(np.abs(grads[n]).max()))
            np.testing.assert_allclose(np.asarray(state["v"][n]),
                                       torch_state["exp_avg_sq"].numpy(), rtol=1e-6,
                                       atol=1e-15)
    assert int(state["step"]) == 3


def test_jitted_training_decreases_digits_loss() -> None:
    p = resolve_pipeline("digits")
    tw = twin(p)
    torch.manual_seed(0)
    params: Any = tw.init()
    state = tw.optimizer.init_state(params)

    @jax.jit
    def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(tw.loss)(params, batch)
        params, state = tw.optimizer.update(grads, state, params)
        return params, state, loss

    evaluate = jax.jit(tw.evaluate)
    first = float(evaluate(params)["val_loss"])
    batches = list(itertools.islice(tw.batches(0), 5))
    losses = []
    for batch in batches:
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    assert float(evaluate(params)["val_loss"]) < first
    assert float(tw.loss(params, batches[0])) < losses[0]


def test_twin_of_another_pipeline_is_an_error() -> None:
    p = dataclasses.replace(resolve_pipeline("digits"), name="mine")
    with pytest.raises(HwportError, match=r"pipeline 'mine' has no JAX twin; twins exist "
                       r"for digits, lm, tiny-gradients"):
        twin(p)
