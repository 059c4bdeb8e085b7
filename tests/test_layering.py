"""The package's layering (docs/architecture.md) holds: import-linter's contracts in pyproject.toml.

Imports inside functions count: a package imports only from the packages below it, the model's modules
form no cycle, only commands render, and the model does no I/O.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[report.find("Broken contracts") :] or report
    assert "4 kept, 0 broken" in report


def test_layers_are_written_down_in_the_architecture_page():
    """docs/architecture.md names every layer of the contract, bottom to top, in the same order."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index('name = "packages are layered"') :]
    block = block[block.index("layers = [") : block.index("]")]
    layers = [line.strip().strip('",') for line in block.splitlines()[1:] if line.strip().startswith('"')]
    doc = (ROOT / "docs" / "architecture.md").read_text()
    positions = []
    for layer in reversed(layers):  # bottom first
        for name in layer.split(" | "):
            short = name.removeprefix("dsv2cli.")
            assert f"`{short}" in doc, f"docs/architecture.md does not name the layer {short}"
            positions.append(doc.index(f"`{short}"))
    assert positions == sorted(positions) or positions == sorted(positions, reverse=True)
