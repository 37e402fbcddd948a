"""The XLA tile-loop grouped matmul against a float64 numpy loop over groups.

Tolerances are the textbook bound for a dot of length L computed with unit
roundoff u_acc and rounded once to the output's u_out:
|err| <= (L * u_acc + u_out) * sum |a| |b|, elementwise. Rows in no group and
empty groups have an empty sum, so they must come out exactly zero.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas import gmm, tgmm
from kernels_pallas.gmm import gmm_int8
from kernels_pallas.gmm.xla import gmm_xla, tgmm_xla, tile_sizes

U_F32 = 2.0**-24


def unit_roundoff(dtype) -> float:
    return float(jnp.finfo(dtype).eps) / 2


def group_of_rows(group_sizes, num_rows) -> np.ndarray:
    """[M] group index per row, -1 for rows past sum(group_sizes)."""
    owner = np.full(num_rows, -1)
    ends = np.cumsum(group_sizes)
    for g, (start, end) in enumerate(zip(ends - group_sizes, ends)):
        owner[start:end] = g
    return owner


def numpy_gmm(lhs, rhs, group_sizes):
    """float64 out[rows of g] = lhs @ rhs[g], and the magnitude sum |lhs| @ |rhs[g]|."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    mag = np.zeros_like(out)
    for row, g in enumerate(group_of_rows(group_sizes, lhs.shape[0])):
        if g >= 0:
            out[row] = lhs[row] @ rhs[g]
            mag[row] = np.abs(lhs[row]) @ np.abs(rhs[g])
    return out, mag


def numpy_tgmm(lhs, grad, group_sizes, num_groups):
    """float64 per-group lhs^T @ grad and its magnitude sum."""
    lhs, grad = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
    owner = group_of_rows(group_sizes, lhs.shape[0])
    out = np.zeros((num_groups, lhs.shape[1], grad.shape[1]))
    mag = np.zeros_like(out)
    for g in range(num_groups):
        rows = owner == g
        out[g] = lhs[rows].T @ grad[rows]
        mag[g] = np.abs(lhs[rows]).T @ np.abs(grad[rows])
    return out, mag


def assert_within_bound(got, want, mag, length, out_dtype, what):
    got = np.asarray(got.astype(jnp.float32), np.float64)
    bound = (max(length, 1) * U_F32 + unit_roundoff(out_dtype)) * mag
    excess = np.abs(got - want) - bound
    assert np.all(excess <= 0), (
        f"{what}: worst excess {excess.max():.3g} at {np.unravel_index(excess.argmax(), excess.shape)}")


NUM_ROWS, K_DIM, N_DIM, NUM_GROUPS = 33, 16, 5, 4  # one shape: hypothesis varies only data


@st.composite
def ragged_sizes(draw):
    """Group sizes that sum to <= M, with empty groups and single-group cases likely."""
    total = draw(st.integers(0, NUM_ROWS))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=NUM_GROUPS - 1,
                                max_size=NUM_GROUPS - 1)))
    return np.diff([0, *cuts, total]).astype(np.int32)


def operands(num_rows, k_dim, n_dim, num_groups, dtype, seed):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(num_rows, k_dim)), dtype)
    rhs = jnp.asarray(rng.normal(size=(num_groups, k_dim, n_dim)), dtype)
    cot = jnp.asarray(rng.normal(size=(num_rows, n_dim)), dtype)
    return lhs, rhs, cot


@functools.partial(jax.jit, static_argnames=("tiles",))
def gmm_and_vjp(lhs, rhs, group_sizes, cot, tiles):
    min_rows, max_rows = tiles
    out, vjp = jax.vjp(lambda a, b: gmm_xla(a, b, group_sizes, min_tile_rows=min_rows,
                                            max_tile_rows=max_rows), lhs, rhs)
    return out, *vjp(cot)


@pytest.mark.parametrize("tiles", [(2, 8), (3, 12), (None, None)], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@settings(max_examples=10)
@given(sizes=ragged_sizes(), seed=st.integers(0, 2**16))
def test_forward_and_vjp_match_numpy(dtype, tiles, sizes, seed):
    lhs, rhs, cot = operands(NUM_ROWS, K_DIM, N_DIM, NUM_GROUPS, dtype, seed)
    out, dlhs, drhs = gmm_and_vjp(lhs, rhs, jnp.asarray(sizes), cot, tiles)
    assert out.dtype == dlhs.dtype == drhs.dtype == dtype

    want, mag = numpy_gmm(lhs, rhs, sizes)
    assert_within_bound(out, want, mag, K_DIM, dtype, "out")
    # dlhs is gmm(cot, rhs^T); drhs is the per-group lhs^T @ cot.
    want, mag = numpy_gmm(cot, jnp.swapaxes(rhs, 1, 2), sizes)
    assert_within_bound(dlhs, want, mag, N_DIM, dtype, "dlhs")
    want, mag = numpy_tgmm(lhs, cot, sizes, NUM_GROUPS)
    assert_within_bound(drhs, want, mag, NUM_ROWS, dtype, "drhs")


@pytest.mark.parametrize("sizes", [[0, 0, 0], [40, 0, 0], [0, 0, 40], [0, 13, 0], [1, 38, 1]],
                         ids=["all-empty", "all-in-first", "all-in-last", "sum<M", "tiny-ends"])
def test_edge_cases_with_multi_level_tiles(sizes):
    lhs, rhs, cot = operands(40, 6, 5, 3, jnp.float32, seed=1)
    sizes = np.asarray(sizes, np.int32)
    out, dlhs, drhs = gmm_and_vjp(lhs, rhs, jnp.asarray(sizes), cot, (2, 16))
    want, mag = numpy_gmm(lhs, rhs, sizes)
    assert_within_bound(out, want, mag, 6, jnp.float32, "out")
    want, mag = numpy_gmm(cot, jnp.swapaxes(rhs, 1, 2), sizes)
    assert_within_bound(dlhs, want, mag, 5, jnp.float32, "dlhs")
    want, mag = numpy_tgmm(lhs, cot, sizes, 3)
    assert_within_bound(drhs, want, mag, 40, jnp.float32, "drhs")


@pytest.mark.parametrize("sizes,num_rows", [
    ([2] * 50, 100), ([9] * 11, 100), ([17] * 5 + [15], 100), ([100], 100), ([7, 93, 30], 100),
    ([57] * 17, 1000)], ids=["50x2", "11x9", "5x17", "one-100", "past-M", "17x57"])
def test_plans_that_fill_a_level_to_its_bound(sizes, num_rows):
    """Sizes rounded up to T_min blocks fill a level's static slots (tiles 64/32/16/8):
    50 one-block groups, 11 two-block ones, 17 groups of 57 rows taking a 64-row tile each
    where 1000 rows hold only 15 such tiles end to end."""
    sizes = np.asarray(sizes, np.int32)
    num_groups = len(sizes)
    lhs, rhs, cot = operands(num_rows, 6, 5, num_groups, jnp.float32, seed=4)
    out, dlhs, drhs = gmm_and_vjp(lhs, rhs, jnp.asarray(sizes), cot, (8, 64))
    want, mag = numpy_gmm(lhs, rhs, sizes)
    assert_within_bound(out, want, mag, 6, jnp.float32, "out")
    want, mag = numpy_gmm(cot, jnp.swapaxes(rhs, 1, 2), sizes)
    assert_within_bound(dlhs, want, mag, 5, jnp.float32, "dlhs")
    want, mag = numpy_tgmm(lhs, cot, sizes, num_groups)
    assert_within_bound(drhs, want, mag, num_rows, jnp.float32, "drhs")
    only = tgmm_xla(lhs, cot, jnp.asarray(sizes), min_tile_rows=8, max_tile_rows=64)
    assert_within_bound(only, want, mag, num_rows, jnp.float32, "tgmm")


def test_single_row_and_one_row_tiles():
    lhs, rhs, cot = operands(1, 3, 2, 2, jnp.float32, seed=6)
    for sizes in ([0, 1], [0, 0]):
        sizes = np.asarray(sizes, np.int32)
        out, dlhs, drhs = gmm_and_vjp(lhs, rhs, jnp.asarray(sizes), cot, (None, None))
        np.testing.assert_allclose(out, numpy_gmm(lhs, rhs, sizes)[0], rtol=1e-6)
        np.testing.assert_allclose(drhs, numpy_tgmm(lhs, cot, sizes, 2)[0], rtol=1e-6)


def test_bf16_with_float32_output():
    lhs, rhs, _ = operands(33, 16, 8, 3, jnp.bfloat16, seed=2)
    sizes = np.asarray([10, 0, 20], np.int32)
    out = gmm_xla(lhs, rhs, jnp.asarray(sizes), preferred_element_type=jnp.float32,
                  min_tile_rows=4, max_tile_rows=16)
    assert out.dtype == jnp.float32
    want, mag = numpy_gmm(lhs, rhs, sizes)
    assert_within_bound(out, want, mag, 16, jnp.float32, "out")


def test_tgmm_matches_numpy():
    lhs, _, cot = operands(33, 5, 4, 4, jnp.float32, seed=3)
    sizes = np.asarray([7, 0, 19, 3], np.int32)
    got = tgmm_xla(lhs, cot, jnp.asarray(sizes), min_tile_rows=2, max_tile_rows=8)
    want, mag = numpy_tgmm(lhs, cot, sizes, 4)
    assert_within_bound(got, want, mag, 33, jnp.float32, "tgmm")


def test_public_entry_points_use_the_tile_loop_on_cpu():
    lhs, rhs, cot = operands(7, 5, 4, 3, jnp.float32, seed=4)
    sizes = jnp.asarray([2, 0, 4], jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda a, b: gmm(a, b, sizes, backend="xla"))(lhs, rhs))
    assert "ragged_dot" not in jaxpr and "while" in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda a, c: tgmm(a, c, sizes, backend="xla"))(lhs, cot))
    assert "while" in jaxpr
    # 'auto' stages every platform's path (lax.platform_dependent); what is lowered for
    # CPU must be the tile loop alone: no ragged_dot, which XLA:CPU expands into a
    # masked [G, M, K] = 3x7x5 broadcast (checked on the 'reference' backend)
    def lowered(fn, *args):
        return jax.jit(fn).lower(*args).as_text()

    assert "tensor<3x7x5xf32>" in lowered(lambda a, b: gmm(a, b, sizes, backend="reference"),
                                          lhs, rhs)
    auto = lowered(lambda a, b: gmm(a, b, sizes), lhs, rhs)
    assert "tensor<3x7x5xf32>" not in auto and "while" in auto
    assert "while" in lowered(lambda a, c: tgmm(a, c, sizes), lhs, cot)
    np.testing.assert_array_equal(gmm(lhs, rhs, sizes, backend="xla"), gmm_xla(lhs, rhs, sizes))


def test_tile_sizes_are_descending_powers_of_two_that_fit():
    assert tile_sizes(65536) == (512, 256, 128, 64)
    assert tile_sizes(100, 8, 512) == (64, 32, 16, 8)
    assert tile_sizes(5) == (5,)  # the tail tile must fit inside lhs


def test_bad_arguments_raise_value_errors():
    lhs, rhs, _ = operands(7, 5, 4, 3, jnp.float32, seed=5)
    sizes = jnp.asarray([2, 0, 4], jnp.int32)
    with pytest.raises(ValueError, match="rhs"):
        gmm_xla(lhs, rhs[0], sizes)
    with pytest.raises(ValueError, match="group_sizes"):
        gmm_xla(lhs, rhs, sizes.astype(jnp.float32))
    with pytest.raises(ValueError, match="do not match"):
        gmm_xla(lhs, rhs[:2], sizes)
    with pytest.raises(ValueError, match="max_tile_rows"):
        gmm_xla(lhs, rhs, sizes, min_tile_rows=8, max_tile_rows=4)



@functools.partial(jax.jit, static_argnames=("backend",))
def gmm_vjp_and_tgmm(lhs, rhs, group_sizes, cot, backend):
    out, vjp = jax.vjp(lambda a, b: gmm(a, b, group_sizes, backend=backend), lhs, rhs)
    return out, *vjp(cot), tgmm(lhs, cot, group_sizes, backend=backend)


@pytest.mark.parametrize("backend", ["xla", "reference", "pallas"])
def test_negative_group_sizes_count_as_zero(backend):
    """Every backend as the tile loop: a negative size is an empty group (ragged_dot gave
    garbage rows, the Pallas kernel NaN weight gradients)."""
    lhs, rhs, cot = operands(7, 4, 3, 3, jnp.float32, seed=11)
    got = gmm_vjp_and_tgmm(lhs, rhs, jnp.asarray([-2, 4, 3], jnp.int32), cot, backend)
    want = gmm_vjp_and_tgmm(lhs, rhs, jnp.asarray([0, 4, 3], jnp.int32), cot, "xla")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["xla", "reference", "pallas"])
def test_sizes_past_int32_are_cut_at_the_last_row(backend):
    """A uint32 size of 2**31 (or an int64 one past it) owns every row to M, as any size
    past M does; the int32 cast of the kernels used to wrap it to a negative size."""
    lhs, rhs, cot = operands(7, 4, 3, 3, jnp.float32, seed=13)
    got = gmm_vjp_and_tgmm(lhs, rhs, jnp.asarray([2, 2**31, 4], jnp.uint32), cot, backend)
    sizes = np.asarray([2, 5, 0])  # group 1 owns the rows left after group 0
    (want_out, _), (want_dlhs, _) = numpy_gmm(lhs, rhs, sizes), numpy_gmm(cot, np.swapaxes(rhs, 1, 2), sizes)
    want_drhs, _ = numpy_tgmm(lhs, cot, sizes, 3)
    for g, w in zip(got, (want_out, want_dlhs, want_drhs, want_drhs)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "auto"])
def test_int8_non_finite_scale_of_one_group_stays_in_it(backend):
    # int8 on CPU ran ragged_dot, which spread the NaN scale of group 1 (empty here) and
    # the inf of group 3 to every row; the tile loop touches only each group's rows
    lhs, _, _ = operands(7, 4, 3, 4, jnp.float32, seed=19)
    rhs_q = jnp.asarray(np.random.default_rng(19).integers(-127, 128, (4, 4, 3)), jnp.int8)
    scale = jnp.asarray([[0.5] * 3, [np.nan] * 3, [0.25] * 3, [np.inf] * 3], jnp.float32)
    sizes = np.asarray([2, 0, 3, 0])
    out = gmm_int8(lhs, rhs_q, scale, jnp.asarray(sizes), backend=backend)
    weights = np.asarray(rhs_q, np.float64) * np.array([0.5, 0, 0.25, 0])[:, None, None]
    np.testing.assert_allclose(out, numpy_gmm(lhs, weights, sizes)[0], rtol=1e-5, atol=1e-5)


def test_group_sizes_may_be_a_list():
    # a list used to fail the shape check as "group_sizes must be 1-D [G], got shape ()"
    lhs, rhs, _ = operands(7, 4, 3, 3, jnp.float32, seed=17)
    np.testing.assert_allclose(gmm(lhs, rhs, [2, 0, 4]), numpy_gmm(lhs, rhs, [2, 0, 4])[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "reference"])
def test_non_finite_rows_stay_in_their_group(backend):
    # M = 32 < T_min: one 32-row tile per group, so group 0's tile overlaps group 1's rows
    # and group 2's the rows past the groups. inf/NaN there, in lhs or in grad, must not
    # reach group 0's or group 2's outputs, lhs gradients or weight gradients.
    lhs, rhs, cot = operands(32, 5, 4, 3, jnp.float32, seed=7)
    sizes = np.asarray([6, 14, 9], np.int32)
    bad_lhs = lhs.at[7].set(jnp.inf).at[30].set(jnp.nan)
    bad_cot = cot.at[6].set(-jnp.inf).at[31].set(jnp.nan)
    clean = np.ones(32, bool)
    clean[6:20] = clean[29:] = False  # group 1's rows and the rows past the groups
    for a, c in ((bad_lhs, cot), (lhs, bad_cot), (bad_lhs, bad_cot)):
        out, dlhs, drhs, weight_grad = gmm_vjp_and_tgmm(a, rhs, jnp.asarray(sizes), c, backend)
        a0, c0 = (np.where(clean[:, None], np.asarray(v), 0) for v in (a, c))
        np.testing.assert_allclose(out[clean], numpy_gmm(a0, rhs, sizes)[0][clean],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dlhs[clean], numpy_gmm(c0, np.swapaxes(rhs, 1, 2), sizes)[0][clean],
                                   rtol=1e-5, atol=1e-6)
        want = numpy_tgmm(a0, c0, sizes, 3)[0][0::2]
        np.testing.assert_allclose(drhs[0::2], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weight_grad[0::2], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["xla", "reference", "pallas"])
def test_zero_groups_give_zeros_on_every_backend(backend):
    # rhs [0, K, N]: no row is in a group, so the output and lhs gradient are zeros and the
    # weight gradient is empty ('xla' failed inside its tile plan with a gather error)
    lhs, _, cot = operands(5, 4, 3, 1, jnp.float32, seed=3)
    out, dlhs, drhs, weight_grad = gmm_vjp_and_tgmm(lhs, jnp.zeros((0, 4, 3)), jnp.zeros((0,), jnp.int32),
                                                    cot, backend)
    assert out.shape == (5, 3) and not np.any(out) and not np.any(dlhs)
    assert drhs.shape == weight_grad.shape == (0, 4, 3)
