"""hwport's built-in pipelines, registered through the same hook a user's would be."""

from __future__ import annotations

from hwport.hookspecs import hookimpl
from hwport.pipeline import PipelineFactory
from hwport.pipelines import digits, lm


@hookimpl
def hwport_pipelines() -> list[PipelineFactory]:
    return [
        PipelineFactory("digits", "MLP on scikit-learn's handwritten digits (accuracy)",
                        digits.pipeline),
        PipelineFactory("lm", "byte-level decoder-only transformer on Python stdlib source "
                        "(loss, perplexity)", lm.pipeline),
    ]
