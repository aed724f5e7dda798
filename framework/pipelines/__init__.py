"""hwport's built-in pipelines, registered through the same hook a user's would be.

The modules are imported when a pipeline is built, so listing backends or formats does
not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

from hwport.hookspecs import hookimpl
from hwport.pipeline import Pipeline, PipelineFactory, check_options


def _digits(**options: Any) -> Pipeline:
    from hwport.pipelines import digits

    check_options("digits", digits.pipeline, options)
    return digits.pipeline(**options)


def _lm(**options: Any) -> Pipeline:
    from hwport.pipelines import lm

    check_options("lm", lm.pipeline, options)
    return lm.pipeline(**options)


@hookimpl
def hwport_pipelines() -> list[PipelineFactory]:
    return [
        PipelineFactory("digits", "MLP on scikit-learn's handwritten digits (accuracy)", _digits),
        PipelineFactory("lm", "byte-level decoder-only transformer on Python stdlib source "
                        "(loss, perplexity)", _lm),
    ]
