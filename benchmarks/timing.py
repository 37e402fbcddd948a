"""Interleaved median timing, for machines whose cores are shared with other work.

Timing candidates one after another lets a burst of foreign load land on one
of them and fake a speed-up. Here every round runs each candidate once, in
turn, and the reported figure is the median over rounds; ratios are then
taken between medians measured under the same load.
"""

import time
from typing import Callable, Mapping

import jax
import numpy as np


def interleaved_medians(candidates: Mapping[str, Callable[[], object]], *,
                        rounds: int = 7, warmup: int = 1) -> dict[str, float]:
    """Seconds per call (median over ``rounds``) for each zero-argument callable.

    Each callable must return JAX arrays (or a pytree of them); the timer
    blocks on the result, so asynchronous dispatch is included. ``warmup``
    calls per candidate run first, so compilation is not timed.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for fn in candidates.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in samples.items()}


def format_table(medians: Mapping[str, float], baseline: str) -> str:
    """One line per candidate: median ms and the ratio to ``baseline``."""
    base = medians[baseline]
    width = max(len(n) for n in medians)
    return "\n".join(f"  {name:<{width}}  {sec * 1e3:9.1f} ms  {sec / base:6.2f}x {baseline}"
                     for name, sec in medians.items())
