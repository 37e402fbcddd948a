"""Strict test settings shared by the whole suite.

8 virtual CPU devices (multi-device code is tested without hardware), rank
promotion raises (a silent broadcast is a bug), and hypothesis is
deterministic so that CI runs are reproducible.

XLA flags (tests/xla_flags.py): LLVM optimisation level 0, since compiling
tiny test shapes is most of the suite's time.
"""

import os

from tests.xla_flags import FAST_COMPILE

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402  (XLA_FLAGS first)
import pytest
from hypothesis import settings

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=25,
                          print_blob=True, database=None)
settings.load_profile("ci")


def pytest_collection_modifyitems(items):
    # The notebooks take minutes each: start them first, so that the xdist workers
    # share out the short tests around them instead of waiting on one at the end.
    items.sort(key=lambda item: "test_notebooks.py::test_runs" not in item.nodeid)


@pytest.fixture(autouse=True)
def _fresh_rank_promotion():
    # A test that relaxes the setting must not leak it into the next one.
    yield
    jax.config.update("jax_numpy_rank_promotion", "raise")
