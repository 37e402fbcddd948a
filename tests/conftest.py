"""Strict test settings shared by the whole suite.

8 virtual CPU devices (multi-device code is tested without hardware), rank
promotion raises (a silent broadcast is a bug), and hypothesis is
deterministic so that CI runs are reproducible.
"""

import jax
import pytest
from hypothesis import settings

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=25,
                          print_blob=True, database=None)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _fresh_rank_promotion():
    # A test that relaxes the setting must not leak it into the next one.
    yield
    jax.config.update("jax_numpy_rank_promotion", "raise")
