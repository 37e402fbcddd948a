"""gmm / tgmm / gmm_int8 Pallas kernels (TPU and GPU variants, interpret mode) vs float64 numpy.

Shapes come from a short list (one jit compile each: interpret mode compiles
slowly), and hypothesis draws the group sizes, which are traced values:
empty groups, one group owning every row, and sum(group_sizes) < M.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kernels_pallas.gmm import gmm
from kernels_pallas.gmm.ops import gmm_int8
from kernels_pallas.gmm.tiling import GmmTiling
from kernels_pallas.gmm.vjp import KernelChoice, gmm_int8_pallas, gmm_pallas, tgmm_pallas
from tests.kernels.gmm_numpy import (assert_close, gmm_np, gmm_vjp_np, tgmm_np,
                                     tgmm_vjp_np)

# name -> (M, K, N, G). Tiles are 8 (TPU kernel) / 16 (GPU kernel, Triton's minimum).
SHAPES = {
    "remainders": (37, 20, 35, 4),      # several tiles per axis; M, K, N leave partial tiles
    "tiny": (5, 3, 7, 2),               # every dim smaller than one tile
}
TILING = {"tpu": GmmTiling(8, 8, 8), "gpu": GmmTiling(16, 16, 16)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@st.composite
def group_sizes_for(draw, m, g):
    """G sizes summing to <= M: sorted cut points give empty groups and short totals."""
    cuts = sorted(draw(st.lists(st.integers(0, m), min_size=g, max_size=g)))
    return np.diff(np.array([0] + cuts)).astype(np.int32)


@st.composite
def gmm_cases(draw):
    name = draw(st.sampled_from(sorted(SHAPES)))
    m, _, _, g = SHAPES[name]
    return name, draw(group_sizes_for(m, g)), draw(st.integers(0, 2**16))


def _operands(shape_name, dtype, seed, *, second_rhs_shape=None):
    m, k, n, g = SHAPES[shape_name]
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal(second_rhs_shape or (g, k, n)), dtype)
    return lhs, rhs, rng


@functools.cache
def _gmm_and_vjp(platform, dtype_name):
    choice = KernelChoice(TILING[platform], interpret=True, platform=platform)
    dtype = jnp.dtype(DTYPES[dtype_name])

    @jax.jit
    def run(lhs, rhs, sizes, d_out):
        out, pullback = jax.vjp(lambda a, b: gmm_pallas(a, b, sizes, dtype, choice), lhs, rhs)
        return out, *pullback(d_out)
    return run


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@settings(max_examples=4)
@given(case=gmm_cases())
@example(case=("remainders", np.array([0, 37, 0, 0], np.int32), 1))   # one group owns all rows
@example(case=("tiny", np.array([0, 0], np.int32), 2))                 # nothing routed
def test_gmm_forward_and_vjp_match_numpy(platform, dtype_name, case):
    shape_name, sizes, seed = case
    lhs, rhs, rng = _operands(shape_name, DTYPES[dtype_name], seed)
    d_out = jnp.asarray(rng.standard_normal((lhs.shape[0], rhs.shape[2])), DTYPES[dtype_name])
    out, d_lhs, d_rhs = _gmm_and_vjp(platform, dtype_name)(lhs, rhs, jnp.asarray(sizes), d_out)
    want_lhs, want_rhs = gmm_vjp_np(lhs, rhs, sizes, d_out)
    assert_close(out, gmm_np(lhs, rhs, sizes), dtype_name, "out")
    assert_close(d_lhs, want_lhs, dtype_name, "d_lhs")
    assert_close(d_rhs, want_rhs, dtype_name, "d_rhs")
    # Rows past sum(group_sizes): exactly zero output and exactly zero gradient.
    tail = int(sizes.sum())
    assert not np.asarray(out[tail:], np.float32).any()
    assert not np.asarray(d_lhs[tail:], np.float32).any()


@functools.cache
def _tgmm_and_vjp(platform):
    choice = KernelChoice(TILING[platform], interpret=True, platform=platform)

    @jax.jit
    def run(lhs, grad, sizes, d_out):
        out, pullback = jax.vjp(
            lambda a, b: tgmm_pallas(a, b, sizes, jnp.dtype(jnp.float32), choice), lhs, grad)
        return out, *pullback(d_out)
    return run


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@settings(max_examples=4)
@given(case=gmm_cases())
@example(case=("remainders", np.array([4, 0, 0, 29], np.int32), 3))  # empty groups -> zeros
def test_tgmm_forward_and_vjp_match_numpy(platform, case):
    shape_name, sizes, seed = case
    m, k, n, g = SHAPES[shape_name]
    lhs, grad, rng = _operands(shape_name, jnp.float32, seed, second_rhs_shape=(m, n))
    d_out = jnp.asarray(rng.standard_normal((g, k, n)), jnp.float32)
    out, d_lhs, d_grad = _tgmm_and_vjp(platform)(lhs, grad, jnp.asarray(sizes), d_out)
    assert_close(out, tgmm_np(lhs, grad, sizes), "float32", "out")
    want_lhs, want_grad = tgmm_vjp_np(lhs, grad, sizes, d_out)
    assert_close(d_lhs, want_lhs, "float32", "d_lhs")
    assert_close(d_grad, want_grad, "float32", "d_grad")
    assert not np.asarray(out)[sizes == 0].any()


def test_gpu_kernels_run_with_x64_enabled():
    # jax_enable_x64 types a Python int as int64: the GPU tgmm's row-step count mixed it
    # with int32 group offsets in lax.div (TypeError in every gmm backward)
    lhs, rhs, rng = _operands("tiny", jnp.float32, seed=4)
    sizes = np.array([2, 3], np.int32)
    d_out = jnp.asarray(rng.standard_normal((lhs.shape[0], rhs.shape[2])), jnp.float32)
    with jax.enable_x64(True):
        out, d_lhs, d_rhs = _gmm_and_vjp("gpu", "float32")(lhs, rhs, jnp.asarray(sizes), d_out)
    want_lhs, want_rhs = gmm_vjp_np(lhs, rhs, sizes, d_out)
    assert_close(out, gmm_np(lhs, rhs, sizes), "float32", "out")
    assert_close(d_lhs, want_lhs, "float32", "d_lhs")
    assert_close(d_rhs, want_rhs, "float32", "d_rhs")


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_gmm_int8_forward_and_vjp_match_dequantized_numpy(platform):
    m, k, n, g = SHAPES["remainders"]
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    rhs_q = jnp.asarray(rng.integers(-127, 128, (g, k, n)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.001, 0.02, (g, n)), jnp.float32)
    d_out = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    sizes = np.array([6, 0, 27, 2], np.int32)  # an empty group and a 2-row tail
    choice = KernelChoice(TILING[platform], interpret=True, platform=platform)

    @jax.jit
    def run(a, s):
        out, pullback = jax.vjp(lambda a, s: gmm_int8_pallas(
            a, rhs_q, s, jnp.asarray(sizes), jnp.dtype(jnp.float32), choice), a, s)
        return out, *pullback(d_out)
    out, d_lhs, d_scale = run(lhs, scale)

    q = np.asarray(rhs_q, np.float64)
    weights = q * np.asarray(scale, np.float64)[:, None, :]
    assert_close(out, gmm_np(lhs, weights, sizes), "float32", "out")
    # d_out is rounded to bf16 (lhs's dtype) before the matmuls: bf16 tolerance.
    assert_close(d_lhs, gmm_vjp_np(lhs, weights, sizes, d_out)[0], "bfloat16", "d_lhs")
    want_d_scale = (tgmm_np(lhs, d_out, sizes) * q).sum(axis=1)
    assert_close(d_scale, want_d_scale, "bfloat16", "d_scale")
    ref = gmm_int8(lhs, rhs_q, scale, jnp.asarray(sizes), backend="reference",
                   preferred_element_type=jnp.float32)
    assert_close(ref, gmm_np(lhs, weights, sizes), "float32", "int8 reference")


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_int8_rows_past_the_groups_stay_zero_with_a_non_finite_scale(platform):
    # The kernels stored 0 * scale[G - 1] in the rows past sum(group_sizes): NaN when the
    # last group (empty here) has an inf scale. The rows of the groups must not see it.
    m, k, n, _ = SHAPES["tiny"]
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    rhs_q = jnp.asarray(rng.integers(-127, 128, (2, k, n)), jnp.int8)
    scale = jnp.asarray([[0.01] * n, [np.inf] * n], jnp.float32)
    sizes = np.array([3, 0], np.int32)
    choice = KernelChoice(TILING[platform], interpret=True, platform=platform)
    out = gmm_int8_pallas(lhs, rhs_q, scale, jnp.asarray(sizes), jnp.dtype(jnp.float32), choice)
    weights = np.asarray(rhs_q, np.float64) * np.array([0.01, 0.0])[:, None, None]
    np.testing.assert_array_equal(np.asarray(out)[3:], 0)
    assert_close(out, gmm_np(lhs, weights, sizes), "float32", "out")


def test_public_gmm_pallas_backend_and_auto_agree_with_numpy():
    """The public entry point: 'pallas' (interpreted here, default tiling) and 'auto'."""
    lhs, rhs, _ = _operands("remainders", jnp.float32, 7)
    sizes = np.array([5, 5, 0, 9], np.int32)
    want = gmm_np(lhs, rhs, sizes)
    for backend in ("pallas", "auto", "reference"):
        assert_close(gmm(lhs, rhs, jnp.asarray(sizes), backend=backend), want, "float32", backend)


def test_tpu_kernels_under_the_tpu_interpreter():
    """The TPU kernels under Pallas's TPU-semantics interpreter: VMEM starts as NaN and
    output blocks reach HBM only when their block index changes, as on hardware; so a
    row that no work item stores, or a block written back too early, shows up here."""
    from jax.experimental.pallas import tpu as pltpu
    from kernels_pallas.gmm.tpu import gmm_tpu, tgmm_tpu
    m, k, n = 20, 12, 10
    sizes = np.array([3, 0, 13], np.int32)   # shared m-tiles, an empty group, a 4-row tail
    rng = np.random.default_rng(5)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, k, n)), jnp.float32)
    grad = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    params = pltpu.InterpretParams(uninitialized_memory="nan")
    kw = dict(tiling=GmmTiling(8, 8, 8), out_dtype=jnp.float32, interpret=params)

    @jax.jit
    def run(lhs, rhs, grad, sizes):
        return gmm_tpu(lhs, rhs, sizes, **kw), tgmm_tpu(lhs, grad, sizes, **kw)
    out, weight_grad = run(lhs, rhs, grad, jnp.asarray(sizes))
    assert_close(out, gmm_np(lhs, rhs, sizes), "float32", "gmm")
    assert_close(weight_grad, tgmm_np(lhs, grad, sizes), "float32", "tgmm")
