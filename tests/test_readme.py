"""README's two commands are what CI runs, and the docs it links to exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md must start with a bash block of two commands"
    return [line for line in block[1].splitlines() if line.strip()]


def test_readme_starts_with_setup_and_test_commands() -> None:
    setup, tests = _readme_commands()
    assert "pip install torch==2.13.0" in setup, "torch must be installed first, pinned"
    assert setup.index("torch==2.13.0") < setup.index("-e"), "torch before the project"
    assert "hwport" in setup.rsplit("&&", 1)[1], "the first command ends with the main job"
    assert "pytest" in tests


def test_ci_runs_exactly_the_readme_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in _readme_commands():
        assert command in ci, f".ci/run must run README's command verbatim: {command}"


def test_linked_docs_exist() -> None:
    for doc in ("README.md", "docs/architecture.md", "docs/spec-format.md", "docs/numerics.md"):
        text = (ROOT / doc).read_text()
        for link in re.findall(r"\]\(([^)#]+\.(?:md|toml))\)", text):
            target = (ROOT / doc).parent / link
            assert target.exists(), f"{doc} links to missing {link}"
