"""Fixtures for the training-application tests: a small text corpus shared by the
xdist workers."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

CORPUS_MODULES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py"]


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, request) -> Path:
    """A directory shared by all xdist workers of this session (per-session otherwise)."""
    base = tmp_path_factory.getbasetemp()
    is_xdist_worker = hasattr(request.config, "workerinput")
    root = base.parent if is_xdist_worker else base
    path = root / "train_shared"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def corpus_file(shared_dir) -> Path:
    """~75 KB of real Python source: enough for the loss to fall in a few dozen steps."""
    path = shared_dir / "corpus.txt"
    if not path.exists():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join((stdlib / name).read_text() for name in CORPUS_MODULES))
        tmp.replace(path)
    return path
