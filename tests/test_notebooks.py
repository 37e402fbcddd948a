"""Every notebook in examples/ runs top to bottom headless, as a reader would run it.

The kernel gets this checkout first on its path, runs in a temporary working
directory, and any cell error fails the test with that cell's traceback.
Committed notebooks carry no outputs and no machine-specific paths.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def test_examples_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == sorted(names) and len(names) >= 1, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_clean(path: Path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit without outputs"
        assert not re.search(r"(/work/|/root/|/home/|/tmp/|C:\\)", cell.source), \
            f"{path.name}: machine-specific path in a cell:\n{cell.source}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs(path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("XLA_FLAGS", raising=False)   # each notebook sets its own device count;
    # no fast-compile flag (tests/xla_flags.py): notebooks train for real, and unoptimised code
    # doubled the training cell of 01
    nb = nbformat.read(path, as_version=4)
    if any("import torch" in c.source for c in nb.cells):
        pytest.importorskip("torch", reason="this notebook compares against PyTorch (the hf extra)")
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
