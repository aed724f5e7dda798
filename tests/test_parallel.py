"""Data-parallel training through each backend's collectives, on real processes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hwport import collectives, plugins, porting, runner
from hwport.errors import HwportError

pytestmark = pytest.mark.usefixtures("reference_cache")


def test_two_rank_lm_on_every_backend_shows_where_collectives_differ() -> None:
    got = {b: runner.run(b, "lm", "train", "amp-bf16", steps=5, world_size=2)
           for b in ("simgpu", "dojo", "dataflow")}
    n = sum(q.numel() for q in runner.resolve_pipeline("lm", 5).model().parameters())
    for r in got.values():
        c = r.collectives
        assert r.outcome in ("converged", "degraded", "stalled", "diverged")
        assert c["world_size"] == 2 and c["reduction_format"] == "fp32"
        # the whole gradient in fp32 (amp-bf16 keeps fp32 gradients) crosses once per step
        assert c["bytes_per_step"] == 4 * n
        assert 0 < c["share_of_step"] < 1
        assert c["gradient_error"]["max_relative"] < 1e-6  # one fp32 addition per value
        json.dumps(r.to_dict(), allow_nan=False)
    assert got["dojo"].collectives["algorithm"] == "mesh2d"
    # the same bytes cost what each spec's links say: slowest on the dataflow chip's
    # (assumed PCIe-class) peer links, fastest over Dojo's mesh
    per_link = {b: collectives.link_bandwidth(plugins.get_backend(b)) for b in got}
    assert per_link["dataflow"] < per_link["simgpu"] < per_link["dojo"]
    t = {b: r.collectives["predicted_s_per_step"] for b, r in got.items()}
    assert t["dataflow"] > t["simgpu"] > t["dojo"]


def test_reduction_format_changes_the_numbers() -> None:
    """The same run with a bf16 reduction: the reduced gradients are off by bf16's
    precision, not fp32's."""
    dojo = plugins.get_backend("dojo")
    bf16 = dataclasses.replace(dojo, name="dojo-bf16-reduce", interconnect=dataclasses.replace(
        dojo.interconnect, reduction_format="bf16"))
    r = runner.run(bf16, "lm", "train", "amp-bf16", steps=5, world_size=2)
    assert r.collectives["reduction_format"] == "bf16"
    assert 1e-4 < r.collectives["gradient_error"]["max_relative"] < 1e-2
    # the telemetry names the cause, and the mitigation that casts the gradients to fp32
    # for the all-reduce restores fp32's error, at twice the bytes of a bf16 reduction
    assert "reduction_error" in porting.diagnose(r)
    fix = plugins.registry().mitigations["fp32-gradient-reduction"]
    f = runner.run(bf16, "lm", "train", fix.apply(plugins.registry().recipe("amp-bf16")),
                   steps=5, world_size=2)
    assert f.collectives["reduction_format"] == "fp32"
    assert f.collectives["gradient_error"]["max_relative"] < 1e-6
    assert f.collectives["bytes_per_step"] == 2 * r.collectives["bytes_per_step"]


def test_bad_data_parallel_requests() -> None:
    with pytest.raises(HwportError, match="data parallelism applies to training"):
        runner.run("simgpu", "lm", "infer", world_size=2)
    with pytest.raises(HwportError, match="needs its pipeline by name"):
        runner.run("simgpu", runner.resolve_pipeline("lm", 2), "train", world_size=2)
    with pytest.raises(HwportError, match="world_size=0"):
        runner.run("simgpu", "lm", "train", world_size=0)
