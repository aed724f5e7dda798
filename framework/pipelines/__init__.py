"""hwport's built-in pipelines, registered through the same hook a user's would be.

The modules are imported when a pipeline is built, so listing backends or formats does
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from hwport.hookspecs import hookimpl
from hwport.pipeline import Pipeline, PipelineFactory, check_options


def _lazy(name: str, module: str) -> Callable[..., Pipeline]:
    """``hwport.pipelines.<module>.pipeline``, imported when first built."""

    def build(**options: Any) -> Pipeline:
        fn = importlib.import_module(f"hwport.pipelines.{module}").pipeline
        check_options(name, fn, options)
        built: Pipeline = fn(**options)
        return built

    return build


@hookimpl
def hwport_pipelines() -> list[PipelineFactory]:
    return [
        PipelineFactory("digits", "MLP on scikit-learn's handwritten digits (accuracy)",
                        _lazy("digits", "digits")),
        PipelineFactory("lm", "byte-level decoder-only transformer on Python stdlib source "
                        "(loss, perplexity)", _lazy("lm", "lm")),
        PipelineFactory("tiny-gradients", "least squares whose loss is weighted 2**-30, so its "
                        "gradients lie below fp16's range (loss)",
                        _lazy("tiny-gradients", "tiny_gradients")),
    ]
