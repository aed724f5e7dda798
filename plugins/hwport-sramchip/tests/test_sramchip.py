"""The plugin's own tests. Install the plugin first (pip install -e .), then run `pytest`.

Tests that take the ``hwport_backend`` fixture run on sramchip (tests/conftest.py makes it
the default of ``--hwport-backend``) and are skipped, by declared capability, where a
``hwport_requires`` mark asks for something the backend does not have.
"""

import subprocess
import sys
from importlib.resources import as_file, files

import hwport
import numpy as np
import pytest
from hwport.plugins import registry
from hwport.testing import read_xfail

PACKAGE = files("hwport_sramchip")


def test_backend_is_registered_by_this_plugin() -> None:
    backend = registry().get("sramchip")
    assert backend.plugin == "sramchip"
    assert backend.origin.startswith("hwport-sramchip ")
    assert not [f for f in registry().failures if f.plugin == "sramchip"], registry().failures


def test_spec_is_valid_and_every_figure_is_sourced() -> None:
    with as_file(PACKAGE / "sramchip.toml") as path:
        spec = hwport.load_spec(path)
        cli = subprocess.run([sys.executable, "-m", "hwport.cli", "validate", str(path)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr
    assert "ok" in cli.stdout and "without a source" not in cli.stdout
    assert spec == hwport.get_backend("sramchip")
    assert spec.unsourced() == []


def test_memory_is_sram_only() -> None:
    (tier,) = hwport.get_backend("sramchip").memory.tiers
    assert tier.name == "sram" and tier.managed == "explicit"
    assert tier.total_capacity == 230e6 and tier.bandwidth == 80e12


def test_known_limitations_file_parses() -> None:
    with as_file(PACKAGE / "known-limitations.txt") as path:
        entries = read_xfail(path)
    assert entries == []  # sramchip passes the whole conformance suite


def test_digits_inference_reaches_an_outcome(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HWPORT_CACHE", str(tmp_path))  # the reference model is trained here
    r = hwport.run("sramchip", "digits", "infer", steps=10)
    assert r.outcome in ("parity", "degraded", "broken")
    # amp-bf16 is lowered: sramchip has no bf16, its nearest 16-bit format is fp16
    assert any("bf16 -> fp16" in note for note in r.lowering), r.lowering


@pytest.mark.hwport_requires("format:fp16", "matmul:fp16")
def test_fp16_matmuls_accumulate_in_fp32(hwport_backend: hwport.BackendSpec) -> None:
    assert hwport_backend.precision.accumulators["fp16"] == "fp32"
    fp16 = hwport_backend.format("fp16")
    x = np.array([1.0, 1.0 + 2.0**-11, 65504.0, 65520.0], np.float32)
    assert hwport.quantize(x, fp16).tolist() == [1.0, 1.0, 65504.0, np.inf]


@pytest.mark.hwport_requires("collective:all_reduce")
def test_all_reduce_is_declared(hwport_backend: hwport.BackendSpec) -> None:
    assert hwport_backend.interconnect.collectives["all_reduce"]


@pytest.mark.hwport_requires("stochastic_rounding")
def test_stochastic_rounding_has_bits(hwport_backend: hwport.BackendSpec) -> None:
    """Skipped on sramchip, which declares no stochastic rounding: a capability, not a name,
    decides (`pytest --hwport-backend all` runs it on the backends that have it)."""
    assert hwport_backend.precision.stochastic_rounding_bits is not None
