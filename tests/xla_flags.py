"""XLA flags of the test suite, for this process (tests/conftest.py) and the subprocesses
tests start (``python -m train``, ``serve``, ``moejax.convert``; not the notebooks, which
train for real: tests/test_notebooks.py).

LLVM's backend optimisation level 0: the suite runs tiny shapes, where
compiling is most of the time and optimised machine code saves nothing; it
cut tests/test_cache_decode.py from 110 s to 74-79 s. Only code generation
changes: the HLO, and so what is computed, is the same.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test subprocess, with ``devices`` virtual CPU devices if given."""
    flags = [FAST_COMPILE]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)
