"""XLA flags of the test suite, for this process (tests/conftest.py) and the subprocesses
tests start (``python -m train``, ``serve``, ``moejax.convert``; not the notebooks, which
train for real: tests/test_notebooks.py).

The suite runs tiny shapes, where compiling is most of the time and fast
machine code saves nothing, so both flags trade run time for compile time:
- LLVM's backend optimisation level 0 cut tests/test_cache_decode.py from
  110 s to 74-79 s;
- XLA:CPU's older loop emitters for fusions instead of its MLIR-based fusion
  emitters cut the compile of a probe (two 2-layer presets' forward and
  cached-decode shapes) from 5.0-5.3 s to 2.9-3.1 s
  (benchmarks/RESULTS.md, "Test suite time").
Only code generation changes: the HLO, and so what is computed, is the same;
elementwise functions may round in the last bit differently, which is within
every tolerance the suite uses (they compare against independent references).
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test subprocess, with ``devices`` virtual CPU devices if given."""
    flags = [FAST_COMPILE]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)
