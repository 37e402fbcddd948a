"""Checks at the library's public boundaries: refuse what cannot be right, with a message.

Nothing is cast silently: wrong dtypes and shapes are refused (TypeError /
ValueError naming the argument, what it got and what is allowed). The checks
look only at static facts (shape, dtype) plus, for token ids, their values
when those are concrete; under ``jit`` values are tracers and cannot be
checked without a device round trip, so the callers document what happens
then. This module imports no jax at load time (``check_writable_dir`` serves
the command lines before jax is imported).
"""

from __future__ import annotations

import operator
import tempfile
from pathlib import Path

import numpy as np


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer (numpy and JAX integer scalars too),
    else None. A bool is not a count, size or id (True would pass as 1)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_traced(x) -> bool:
    import jax
    return isinstance(x, jax.core.Tracer)


def moe_input(x_BSD, d_model: int) -> None:
    """``MoE`` input: a floating-point [B, S, d_model] array with at least one token.

    Integer input is refused (an MoE of token ids is a bug, and the output would
    come back truncated to integers); an empty batch is refused (nothing to
    route: the balance statistics are fractions of the batch)."""
    import jax.numpy as jnp  # its issubdtype knows bfloat16 and float8 (numpy's does not)
    dtype = jnp.dtype(x_BSD.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"MoE expects floating-point x, got {dtype}; cast it first "
                        f"(e.g. x.astype(jnp.float32)); token ids go through Transformer")
    if x_BSD.ndim != 3 or x_BSD.shape[-1] != d_model:
        raise ValueError(f"MoE expects x of shape [B, S, {d_model}], got {tuple(x_BSD.shape)}")
    if x_BSD.shape[0] * x_BSD.shape[1] == 0:
        raise ValueError(f"MoE got an empty batch (x of shape {tuple(x_BSD.shape)}): no tokens to route")


def token_ids(tokens_BS, vocab_size: int) -> None:
    """``Transformer`` input: integer token ids [B, S] with at least one token, in
    ``[0, vocab_size)`` when the values are concrete (not traced)."""
    import jax
    import jax.numpy as jnp
    dtype = jnp.dtype(tokens_BS.dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got {dtype}")
    if tokens_BS.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens_BS.shape)}")
    if tokens_BS.shape[0] * tokens_BS.shape[1] == 0:
        raise ValueError(f"tokens of shape {tuple(tokens_BS.shape)} hold no token")
    if _is_traced(tokens_BS) or not getattr(tokens_BS, "is_fully_addressable", True):
        return
    # concrete ids can still meet a trace (an array closed over by a jitted function): the
    # reductions must run now, not be staged as tracers that int() cannot read
    with jax.ensure_compile_time_eval():
        low, high = int(jnp.min(tokens_BS)), int(jnp.max(tokens_BS))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size}) "
                         f"(vocab_size={vocab_size})")


def check_writable_dir(path: str | Path, what: str = "directory") -> None:
    """``path`` is a directory, or can be created as one, that this process can write in.

    os.access is no guide (root, read-only mounts, /proc): the parent that would
    hold it is tried with a temporary directory that is removed at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} exists and is not a directory")
    probe = path if path.is_dir() else next((p for p in path.absolute().parents if p.exists()), None)
    if probe is None or not probe.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(probe)!r} is not a directory")
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".moejax-probe-").cleanup()
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r}: cannot write in {str(probe)!r} "
                         f"({err.strerror or err})") from None
