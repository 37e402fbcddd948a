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


def interleaved_samples(candidates: Mapping[str, Callable[[], object]], *,
                        rounds: int = 7, warmup: int = 1,
                        cpu_samples: dict[str, list[float]] | None = None
                        ) -> dict[str, list[float]]:
    """Seconds of each call, ``rounds`` per zero-argument callable, run in turn.

    Each callable must return JAX arrays (or a pytree of them, or None); the
    timer blocks on the result, so asynchronous dispatch is included.
    ``warmup`` calls per candidate run first, so compilation is not timed.
    ``cpu_samples``, when given, receives the process CPU seconds of each call
    (all threads): on an oversubscribed machine the work done, where wall time
    also counts the waits for a core.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}")
    for fn in candidates.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates} if cpu_samples is None else cpu_samples
    for _ in range(rounds):
        for name, fn in candidates.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - start)
            cpu.setdefault(name, []).append(time.process_time() - cpu_start)
    return samples


def interleaved_medians(candidates: Mapping[str, Callable[[], object]], *,
                        rounds: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, from ``interleaved_samples``."""
    samples = interleaved_samples(candidates, rounds=rounds, warmup=warmup)
    return {name: float(np.median(s)) for name, s in samples.items()}


def interleaved_minima(candidates: Mapping[str, Callable[[], object]], *,
                       rounds: int = 7, warmup: int = 1) -> dict[str, float]:
    """Fastest call of each candidate: the least load-sensitive figure on a busy machine."""
    samples = interleaved_samples(candidates, rounds=rounds, warmup=warmup)
    return {name: float(np.min(s)) for name, s in samples.items()}


def format_table(samples: Mapping[str, list[float]], baseline: str) -> str:
    """One line per candidate: median and fastest ms, and both as ratios to ``baseline``.

    The median is the headline figure; the fastest call is the one least
    disturbed by other work on a shared machine. A first line says how many
    rounds each figure comes from and which way the ratios go.
    """
    med = {name: float(np.median(s)) for name, s in samples.items()}
    low = {name: float(np.min(s)) for name, s in samples.items()}
    width = max(len(n) for n in samples)
    counts = {name: len(s) for name, s in samples.items()}
    rounds = (str(counts[baseline]) if len(set(counts.values())) == 1
              else ", ".join(f"{n} {name}" for name, n in counts.items()))
    lines = [f"  time per call over interleaved rounds ({rounds}); ratio = time / {baseline}'s",
             f"  {'':<{width}}  {'median':>9}  {'ratio':>6}  {'fastest':>9}  {'ratio':>6}"]
    for name in samples:
        lines.append(f"  {name:<{width}}  {_ms(med[name])}  {med[name] / med[baseline]:5.2f}x"
                     f"  {_ms(low[name])}  {low[name] / low[baseline]:5.2f}x")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    """Milliseconds to three significant figures or more, so a sub-ms call does not print as 0."""
    ms = seconds * 1e3
    decimals = 0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3
    return f"{ms:6.{decimals}f} ms"
