"""The built-in observer: every finished cell as TensorBoard event files.

A plugin of the same mechanism as a third party's exporter (the ``hwport_run_finished``
hook). It writes when ``$HWPORT_TENSORBOARD`` names a log directory (``--tensorboard DIR``
on ``hwport run``, ``compare`` and ``port`` sets it) and the ``tensorboard`` package is
installed; otherwise it does nothing and says nothing.

Each cell is one TensorBoard run, ``<pipeline>/<mode>/<backend>/<recipe>-s<seed>`` (with the
stored run's id in front when the cell was stored): the per-step training loss and
validation metrics under ``<pipeline>/<metric>``, the cell's final metrics, telemetry
totals and predicted step time, and its outcome and lowering notes as text. The fp32
reference training of a pipeline is written once, as ``<pipeline>/train/reference-fp32``,
so that TensorBoard draws every backend's curve over the reference's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwport.hookspecs import hookimpl

if TYPE_CHECKING:
    from hwport.runner import RunInfo, RunResult

ENV = "HWPORT_TENSORBOARD"


def _writer(logdir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is not installed: silent, by design
        return None
    return SummaryWriter(str(logdir))


def _scalars(writer: Any, prefix: str, curve: list[dict[str, float]]) -> None:
    for point in curve:
        step = int(point["step"])
        for name, value in point.items():
            if name != "step" and isinstance(value, int | float) and math.isfinite(value):
                writer.add_scalar(f"{prefix}/{name}", value, step)


@hookimpl
def hwport_run_finished(run: RunInfo, result: RunResult) -> None:
    root = os.environ.get(ENV)
    if not root:
        return
    base = Path(root)
    if run.run_id is not None:
        base = base / f"run{run.run_id}"
    name = base / run.pipeline / run.mode / run.backend / f"{run.recipe}-s{run.seed}"
    writer = _writer(name)
    if writer is None:
        return
    with writer:
        _scalars(writer, run.pipeline, result.curve)
        last = max((int(p["step"]) for p in result.curve), default=result.steps)
        for k, v in result.metrics.items():
            if math.isfinite(v):
                writer.add_scalar(f"final/{k}", v, last)
        for k, v in result.agreement.items():
            if math.isfinite(v):
                writer.add_scalar(f"final/agreement_{k}", v, last)
        rounding = result.telemetry.get("rounding", {})
        for what in ("overflow", "underflow"):
            writer.add_scalar(f"telemetry/{what}", sum(c[what] for c in rounding.values()),
                              last)
        if result.time.get("step_s"):
            writer.add_scalar("predicted/step_s", result.time["step_s"], last)
        if result.memory.get("total"):
            writer.add_scalar("predicted/memory_bytes", result.memory["total"], last)
        writer.add_text("outcome", f"**{result.outcome}** ({run.label})", last)
        if result.lowering:
            writer.add_text("lowering", "\n".join(f"- {n}" for n in result.lowering), last)
    reference = base / run.pipeline / "train" / f"reference-fp32-s{run.seed}"
    if result.reference_curve and not reference.exists():
        ref_writer = _writer(reference)
        with ref_writer:
            _scalars(ref_writer, run.pipeline, result.reference_curve)
