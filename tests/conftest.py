"""Strict test settings shared by the whole suite.

8 virtual CPU devices (multi-device code is tested without hardware), rank
promotion raises (a silent broadcast is a bug), and hypothesis is
deterministic so that CI runs are reproducible.

XLA flags (tests/xla_flags.py): LLVM optimisation level 0, since compiling
tiny test shapes is most of the suite's time. For the same reason one
persistent compilation cache serves the whole session: both xdist workers and
every subprocess a test starts (``python -m train``, ``serve``, the notebooks'
kernels) inherit it, so the many tests that build the same tiny model compile
its functions once. A cache hit loads the executable XLA compiled for the same
HLO and flags, so nothing computed changes. It is a fresh directory per session
(removed at the end) unless JAX_COMPILATION_CACHE_DIR is already set.
"""

import os
import shutil
import tempfile

from tests.xla_flags import FAST_COMPILE

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
# Set in the xdist controller, which loads this file before it starts the workers.
_OWN_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="moejax-xla-cache-")
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402  (XLA_FLAGS first)
import pytest
from hypothesis import settings

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=25,
                          print_blob=True, database=None)
settings.load_profile("ci")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
    # The notebooks take minutes each: start them first, so that the xdist workers
    # share out the short tests around them instead of waiting on one at the end.
    items.sort(key=lambda item: "test_notebooks.py::test_runs" not in item.nodeid)


@pytest.fixture(autouse=True)
def _fresh_rank_promotion():
    # A test that relaxes the setting must not leak it into the next one.
    yield
    jax.config.update("jax_numpy_rank_promotion", "raise")
