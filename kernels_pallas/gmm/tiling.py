"""Tile sizes for the grouped-matmul kernels: a validated frozen config and a default."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class GmmTiling:
    """Block sizes (rows of lhs, contraction, output columns) of one kernel step.

    Any positive sizes run in interpret mode. Compiled kernels add hardware
    rules, checked when the kernel is built: on TPU a tile must equal its
    array dimension or be a multiple of the (sublane, lane) tile (tm of 8 or
    16 for 16-bit inputs, 32 for int8 weights; tk and tn of 128); on GPU
    (Triton) every tile must be a power of two.
    """

    tm: int
    tk: int
    tn: int

    def __post_init__(self):
        for name in ("tm", "tk", "tn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"GmmTiling.{name} must be a positive int, got {value!r}")

    @classmethod
    def coerce(cls, tiling):
        """Accept None (meaning: use the default), a GmmTiling, or a (tm, tk, tn) tuple."""
        if tiling is None or isinstance(tiling, cls):
            return tiling
        if isinstance(tiling, (tuple, list)) and len(tiling) == 3:
            return cls(*tiling)
        raise ValueError(
            f"tiling must be None, a GmmTiling or a (tm, tk, tn) tuple, got {tiling!r}")


def _fit(dim, preferred, align):
    """Largest tile <= preferred that is legal on TPU: the whole dim or a multiple of align."""
    if dim <= preferred:
        return dim
    return max(align, preferred - preferred % align)


def default_tpu_tiling(m, k, n, *, sublane=16):
    """Heuristic TPU tiles: 512x512 output blocks, 512-deep contraction steps.

    Large tiles keep the MXU busy and amortise the ~0.35 us per grid step;
    512x512 f32 accumulators plus double-buffered bf16 inputs stay well inside
    the default scoped VMEM (16-32 MiB) on v4/v5e/v5p/v6e. Dims smaller than a
    tile use the whole dim, which is always a legal block.
    """
    return GmmTiling(tm=_fit(m, 512, sublane), tk=_fit(k, 512, 128), tn=_fit(n, 512, 128))


def _pow2_at_least(x, floor, cap):
    p = floor
    while p < min(x, cap):
        p *= 2
    return p


def default_gpu_tiling(m, k, n):
    """Heuristic Triton tiles: powers of two, 64x128 outputs, 64-deep k steps.

    Tensor-core dots want every tile >= 16; a dim smaller than the preferred
    tile gets the next power of two covering it (remainders are masked). Three
    pipeline stages of bf16 64x64 + 64x128 tiles use ~72 KiB of shared memory.
    Not tuned on hardware (no GPU was available when this was written).
    """
    return GmmTiling(tm=_pow2_at_least(m, 16, 64), tk=_pow2_at_least(k, 16, 64),
                     tn=_pow2_at_least(n, 16, 128))


def check_tpu_tiling(tiling, m, k, n, *, sublane):
    """ValueError unless every tile is the whole dim or a multiple of the TPU (sublane, 128) tile."""
    for name, tile, dim, align in (("tm", tiling.tm, m, sublane), ("tk", tiling.tk, k, 128),
                                   ("tn", tiling.tn, n, 128)):
        if tile != dim and tile % align:
            raise ValueError(
                f"tiling.{name}={tile} is not legal on TPU for a dimension of {dim}: "
                f"use {dim} or a multiple of {align}")


def check_gpu_tiling(tiling):
    """ValueError unless every tile is a power of two >= 16 (Triton tensor-core dots)."""
    for name in ("tm", "tk", "tn"):
        tile = getattr(tiling, name)
        if tile < 16 or tile & (tile - 1):
            raise ValueError(
                f"tiling.{name}={tile} is not legal for the GPU (Triton) kernel: "
                "use a power of two >= 16")

