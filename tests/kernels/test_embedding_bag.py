"""embedding_bag: every backend against a float64 numpy loop, plus the backward's
determinism, its lack of scatter-adds, and the TPU (Mosaic) and GPU (Triton)
lowerings.

Shapes come from a short list (each new shape is a new compilation, and the
Pallas interpreter compiles slowly); hypothesis draws the data: index
patterns with heavy repetition, out-of-range ids, dtypes, seeds.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas import embedding_bag
from kernels_pallas.embedding_bag import pallas_tpu, reference

# (N, D, T, k): T is not a multiple of the token block (8 rows for f32, 16
# for bf16) and spans several blocks and both grid splits (pallas_tpu picks
# 8 / 16 rows here); k = 1; D not a multiple of 128.
SHAPES = [(40, 128, 37, 4), (5, 48, 13, 1)]
DTYPES = [jnp.float32, jnp.bfloat16]
PATTERNS = ["uniform", "few_rows", "same_row_twice_in_bag", "one_row", "out_of_range"]


def bruteforce(table, indices, weights, grad):
    """float64 loops over tokens and bag slots; ids clamped like the library does."""
    table, weights, grad = (np.asarray(x, np.float64) for x in (table, weights, grad))
    num_rows, d = table.shape
    ids = np.clip(np.asarray(indices), 0, num_rows - 1)
    num_tokens, k = ids.shape
    out, out_scale = np.zeros((num_tokens, d)), np.zeros((num_tokens, d))
    d_table, d_table_scale = np.zeros_like(table), np.zeros_like(table)
    d_weights, d_weights_scale = np.zeros((num_tokens, k)), np.zeros((num_tokens, k))
    for t in range(num_tokens):
        for j in range(k):
            row = table[ids[t, j]]
            out[t] += weights[t, j] * row
            out_scale[t] += abs(weights[t, j] * row)
            d_table[ids[t, j]] += weights[t, j] * grad[t]
            d_table_scale[ids[t, j]] += abs(weights[t, j] * grad[t])
            d_weights[t, j] = grad[t] @ row
            d_weights_scale[t, j] = abs(grad[t]) @ abs(row)
    counts = np.bincount(ids.reshape(-1), minlength=num_rows)
    return (out, out_scale), (d_table, d_table_scale, counts), (d_weights, d_weights_scale)


def make_inputs(shape, dtype, pattern, seed):
    num_rows, d, num_tokens, k = shape
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((num_rows, d)).astype(dtype)
    weights = rng.standard_normal((num_tokens, k)).astype(np.float32)
    grad = rng.standard_normal((num_tokens, d)).astype(dtype)
    high = {"few_rows": min(2, num_rows), "one_row": 1}.get(pattern, num_rows)
    indices = rng.integers(0, high, (num_tokens, k)).astype(np.int32)
    if pattern == "same_row_twice_in_bag" and k > 1:
        indices[:, 1] = indices[:, 0]
    if pattern == "out_of_range":
        indices = rng.integers(-3, num_rows + 3, (num_tokens, k)).astype(np.int32)
    return table, indices, weights, grad


@functools.partial(jax.jit, static_argnames="backend")
def forward_and_vjp(table, indices, weights, grad, backend):
    out, vjp = jax.vjp(lambda t, w: embedding_bag(t, indices, w, backend=backend),
                       table, weights)
    return (out, *vjp(grad))


def assert_close(got, want, scale, rel, what):
    """|got - want| <= rel * scale, where scale bounds the sum of |terms|."""
    err = np.abs(np.asarray(got, np.float64) - want)
    bound = rel * scale + 1e-30
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"{what}: error {err[worst]:.3g} > bound {bound[worst]:.3g} "
                                  f"at {worst}")


def check_against_bruteforce(backend, shape, dtype, pattern, seed):
    table, indices, weights, grad = make_inputs(shape, dtype, pattern, seed)
    out, d_table, d_weights = forward_and_vjp(table, indices, weights, grad, backend=backend)
    assert out.dtype == dtype and d_table.dtype == dtype and d_weights.dtype == jnp.float32
    (o, o_s), (dt, dt_s, counts), (dw, dw_s) = bruteforce(table, indices, weights, grad)
    eps_out = float(jnp.finfo(dtype).eps)  # one rounding of an f32 sum into dtype
    eps_acc = float(jnp.finfo(jnp.float32).eps)
    k, d = shape[3], shape[1]
    assert_close(out, o, o_s, eps_out + k * eps_acc, "out")
    # The pallas and xla backends sum duplicate rows in f32; the reference is
    # differentiated by JAX, whose scatter-add sums them in the table dtype.
    dup = counts[:, None] if backend == "reference" else 1
    assert_close(d_table, dt, dt_s, dup * eps_out + counts.max() * eps_acc, "d_table")
    assert_close(d_weights, dw, dw_s, d * eps_acc, "d_weights")


@pytest.mark.parametrize("backend", ["pallas_tpu", "xla", "reference"])
@settings(max_examples=8)
@given(shape=st.sampled_from(SHAPES), dtype=st.sampled_from(DTYPES),
       pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2**16))
def test_matches_float64_bruteforce(backend, shape, dtype, pattern, seed):
    check_against_bruteforce(backend, shape, dtype, pattern, seed)


@pytest.mark.parametrize("backend", ["pallas_tpu", "xla"])
def test_every_shape_and_dtype_once(backend):
    # hypothesis may skip a combination; the kernel's block edge cases must not be.
    for shape in SHAPES:
        for dtype in DTYPES:
            check_against_bruteforce(backend, shape, dtype, "few_rows", seed=0)


@pytest.mark.parametrize("shape, dtype", [(SHAPES[0], jnp.float32), (SHAPES[1], jnp.bfloat16)])
def test_gpu_kernel_matches_float64_bruteforce(shape, dtype):
    # The Triton kernels in interpret mode (D = 48: column blocks of 16).
    check_against_bruteforce("pallas_gpu", shape, dtype, "same_row_twice_in_bag", seed=5)


def test_out_of_range_indices_are_clamped():
    # Same shapes as SHAPES[0], so the compiled functions are reused.
    table, wild, weights, grad = make_inputs(SHAPES[0], np.float32, "out_of_range", 0)
    assert (wild < 0).any() and (wild >= SHAPES[0][0]).any()
    clamped = np.clip(wild, 0, SHAPES[0][0] - 1)
    for backend in ("pallas_tpu", "xla", "reference"):
        got = forward_and_vjp(table, wild, weights, grad, backend=backend)
        want = forward_and_vjp(table, clamped, weights, grad, backend=backend)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    (o, o_s), _, _ = bruteforce(table, clamped, weights, grad)
    assert_close(got[0], o, o_s, 8 * float(jnp.finfo(jnp.float32).eps), "out")


def assert_matches_bruteforce(got, table, indices, weights, grad):
    """float32 forward and vjp against the float64 loops (bounds as check_against_bruteforce)."""
    (o, o_s), (dt, dt_s, counts), (dw, dw_s) = bruteforce(table, indices, weights, grad)
    eps = float(jnp.finfo(jnp.float32).eps)
    assert_close(got[0], o, o_s, (1 + indices.shape[1]) * eps, "out")
    assert_close(got[1], dt, dt_s, (1 + counts.max()) * eps, "d_table")
    assert_close(got[2], dw, dw_s, table.shape[1] * eps, "d_weights")


def test_indices_past_int32_are_clamped_too():
    # uint32 ids of 2**31 and more read row N - 1; the int32 cast before the clip
    # wrapped them to negative ids, which read row 0.
    table, indices, weights, grad = make_inputs(SHAPES[1], np.float32, "uniform", 1)
    wild = indices.astype(np.uint32)
    wild[::3, 0] = 2**31 + 5
    for backend in ("pallas_tpu", "xla", "reference"):
        got = forward_and_vjp(table, wild, weights, grad, backend=backend)
        assert_matches_bruteforce(got, table, wild.astype(np.int64), weights, grad)


def test_tpu_kernel_runs_with_x64_enabled():
    # jax_enable_x64 made a Python 2 in the kernel's slot arithmetic int64: TypeError
    table, indices, weights, grad = make_inputs(SHAPES[1], np.float32, "uniform", 2)
    with jax.enable_x64(True):
        got = forward_and_vjp(table, indices, weights, grad, backend="pallas_tpu")
    assert_matches_bruteforce(got, table, indices, weights, grad)


def test_xla_chunked_path_matches(monkeypatch):
    # Calls whose gathered rows exceed CHUNK_BYTES run in token chunks
    # (lax.map, forward and d_weights); shrink the limit so that a small
    # input takes that path, remainder chunk included (37 = 7 * 5 + 2).
    monkeypatch.setattr(reference, "CHUNK_BYTES", 5 * 3 * 128 * 4)
    table, indices, weights, grad = make_inputs((11, 128, 37, 3), np.float32, "few_rows", 1)
    (o, o_s), (dt, dt_s, counts), (dw, dw_s) = bruteforce(table, indices, weights, grad)
    fresh = jax.jit(lambda t, i, w, g: forward_and_vjp.__wrapped__(t, i, w, g, "xla"))
    out, d_table, d_weights = fresh(table, indices, weights, grad)
    eps = float(jnp.finfo(jnp.float32).eps)
    assert_close(out, o, o_s, 4 * eps, "out")
    assert_close(d_table, dt, dt_s, (1 + counts.max()) * eps, "d_table")
    assert_close(d_weights, dw, dw_s, 128 * eps, "d_weights")


def test_pallas_splits_long_inputs_into_calls(monkeypatch):
    # Row ids live in SMEM, so long inputs are cut into several pallas_calls
    # (here 8 + 4 tokens; forward and d_weights share the cutting code).
    monkeypatch.setattr(pallas_tpu, "MAX_IDS_PER_CALL", 8 * 3)
    table, indices, weights, grad = make_inputs((11, 128, 12, 3), np.float32, "few_rows", 4)
    (o, o_s), _, _ = bruteforce(table, indices, weights, grad)
    forward = jax.jit(functools.partial(pallas_tpu.forward, out_dtype=jnp.float32,
                                        interpret=True))
    assert_close(forward(table, indices, weights), o, o_s, 4 * float(jnp.finfo(jnp.float32).eps),
                 "out")


def _primitive_names(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _primitive_names(sub)


@pytest.mark.parametrize("backend", ["pallas_tpu", "xla"])
def test_backward_is_deterministic_and_scatter_free(backend):
    # Same shapes as SHAPES[0], so the compiled vjp is reused.
    args = make_inputs(SHAPES[0], np.float32, "few_rows", 2)
    names = set(_primitive_names(jax.make_jaxpr(
        functools.partial(forward_and_vjp.__wrapped__, backend=backend))(*args).jaxpr))
    assert not any("scatter" in n for n in names), sorted(names)
    assert "scatter" not in forward_and_vjp.lower(*args, backend=backend).as_text()
    first = forward_and_vjp(*args, backend=backend)
    again = forward_and_vjp(*args, backend=backend)
    for x, y in zip(first, again):  # bit for bit
        assert np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


def test_scatter_check_can_fail():
    # Positive control: JAX's own transpose of the gather (the reference
    # backend) is a scatter-add, and the jaxpr walk above finds it.
    args = make_inputs(SHAPES[0], np.float32, "few_rows", 3)
    jaxpr = jax.make_jaxpr(functools.partial(forward_and_vjp.__wrapped__,
                                             backend="reference"))(*args).jaxpr
    assert "scatter-add" in set(_primitive_names(jaxpr))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tpu_kernel_lowers_forward_and_vjp(dtype):
    table = jax.ShapeDtypeStruct((1000, 256), dtype)
    indices = jax.ShapeDtypeStruct((300, 32), jnp.int32)
    weights = jax.ShapeDtypeStruct((300, 32), jnp.float32)
    grad = jax.ShapeDtypeStruct((300, 256), dtype)
    bag = functools.partial(embedding_bag, backend="pallas_tpu", interpret=False)

    def vjp(t, i, w, g):
        return jax.vjp(lambda t, w: bag(t, i, w), t, w)[1](g)

    forward = jax.export.export(jax.jit(bag), platforms=["tpu"])(table, indices, weights)
    backward = jax.export.export(jax.jit(vjp), platforms=["tpu"])(table, indices, weights, grad)
    assert "tpu_custom_call" in forward.mlir_module()
    assert backward.mlir_module().count("tpu_custom_call") >= 1  # the d_weights kernel
    assert "scatter" not in backward.mlir_module()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_lowers_forward_and_vjp(dtype):
    table = jax.ShapeDtypeStruct((1000, 96), dtype)  # D = 96: column blocks of 32
    indices = jax.ShapeDtypeStruct((300, 32), jnp.int32)
    weights = jax.ShapeDtypeStruct((300, 32), jnp.float32)
    grad = jax.ShapeDtypeStruct((300, 96), dtype)
    bag = functools.partial(embedding_bag, backend="pallas_gpu", interpret=False)

    def vjp(t, i, w, g):
        return jax.vjp(lambda t, w: bag(t, i, w), t, w)[1](g)

    # Triton calls carry no serialization-compatibility guarantee; that is
    # about storing the artifact, not about whether the kernel lowers.
    export = functools.partial(
        jax.export.export, platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
    forward = export(jax.jit(bag))(table, indices, weights)
    backward = export(jax.jit(vjp))(table, indices, weights, grad)
    assert "__gpu$xla.gpu.triton" in forward.mlir_module()
    assert "__gpu$xla.gpu.triton" in backward.mlir_module()
    assert "scatter" not in backward.mlir_module()


def test_export_shapes_and_dtypes():
    out = jax.eval_shape(functools.partial(embedding_bag, preferred_element_type=jnp.float32),
                         jax.ShapeDtypeStruct((10, 64), jnp.bfloat16),
                         jax.ShapeDtypeStruct((4, 2), jnp.int32),
                         jax.ShapeDtypeStruct((4, 2), jnp.bfloat16))
    assert out.shape == (4, 64) and out.dtype == jnp.float32


@pytest.mark.parametrize("table_shape, idx_shape, idx_dtype, w_shape, w_dtype, kwargs, match", [
    ((10,), (4, 2), jnp.int32, (4, 2), jnp.float32, {}, "table must be a floating"),
    ((10, 8), (4, 2), jnp.int32, (4, 2), jnp.float32, {"backend": "gpu"}, "backend must be"),
    ((0, 8), (4, 2), jnp.int32, (4, 2), jnp.float32, {}, "at least one row"),
    ((10, 8), (4,), jnp.int32, (4,), jnp.float32, {}, "indices must be an integer"),
    ((10, 8), (4, 2), jnp.float32, (4, 2), jnp.float32, {}, "indices must be an integer"),
    ((10, 8), (4, 2), jnp.int32, (4, 2), jnp.int32, {}, "weights must be a floating"),
    ((10, 8), (4, 2), jnp.int32, (4, 3), jnp.float32, {}, "must equal indices shape"),
    ((10, 8), (4, 0), jnp.int32, (4, 0), jnp.float32, {}, "k >= 1"),
])
def test_bad_input_raises(table_shape, idx_shape, idx_dtype, w_shape, w_dtype, kwargs, match):
    with pytest.raises(ValueError, match=match):
        embedding_bag(jnp.zeros(table_shape, jnp.float32), jnp.zeros(idx_shape, idx_dtype),
                      jnp.zeros(w_shape, w_dtype), **kwargs)


def test_int_table_is_rejected():
    with pytest.raises(ValueError, match="table must be a floating"):
        embedding_bag(jnp.zeros((3, 4), jnp.int32), jnp.zeros((2, 1), jnp.int32),
                      jnp.ones((2, 1), jnp.float32))


def test_eager_calls_reuse_the_compiled_kernel():
    # Each call used to build a fresh pallas_call (about 2 s of compilation per
    # eager call in interpret mode); the second call must hit the cache.
    table, indices, weights, _ = make_inputs(SHAPES[1], np.float32, "uniform", 6)
    first = embedding_bag(table, indices, weights, backend="pallas_tpu")
    cached = pallas_tpu.forward._cache_size()
    again = embedding_bag(table, indices, weights, backend="pallas_tpu")
    assert pallas_tpu.forward._cache_size() == cached
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


def test_no_tokens_gives_empty_output():
    out = embedding_bag(jnp.ones((3, 4), ml_dtypes.bfloat16), jnp.zeros((0, 2), jnp.int32),
                        jnp.zeros((0, 2), jnp.float32))
    assert out.shape == (0, 4) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("backend", ["xla", "pallas_tpu"])
def test_inside_shard_map_with_a_replicated_table(backend):
    # ids and weights split over 4 devices, the table replicated: the table gradient is
    # the sum over the shards (as jnp autodiff of the same sharded loss gives it)
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    indices = jnp.asarray(rng.integers(0, 16, size=(16, 3)), jnp.int32).at[0].set(5)
    weights = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)

    def sharded_loss(bag):
        def loss(table, indices, weights):
            def local(ids, w):
                return jax.lax.psum(jnp.sum(jnp.sin(bag(table, ids, w))), "x")
            return jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P("x")),
                                 out_specs=P())(indices, weights)
        return jax.jit(jax.grad(loss, argnums=(0, 2)))

    with jax.set_mesh(mesh):
        got = sharded_loss(functools.partial(embedding_bag, backend=backend))(table, indices, weights)
        want = sharded_loss(lambda t, i, w: jnp.einsum("tk,tkd->td", w, t[i]))(table, indices, weights)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
