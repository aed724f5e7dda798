"""Run the ``hwport_backend`` tests on sramchip unless ``--hwport-backend`` says otherwise."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--hwport-backend"):
        config.option.hwport_backend = ["sramchip"]
