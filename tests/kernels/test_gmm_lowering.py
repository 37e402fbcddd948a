"""The gmm kernels lower for their hardware on this CPU-only machine, and bad input is refused.

jax.export runs the Pallas -> Mosaic (TPU) and Pallas -> Triton (CUDA)
lowering, which catches block-shape, dtype and unsupported-op errors without
the hardware. Triton's custom call has no export compatibility guarantee, so
the CUDA exports name it explicitly as an accepted target.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.gmm import GmmTiling, gmm, gmm_int8, tgmm

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"
TARGET = {"tpu": "tpu_custom_call", "cuda": TRITON}
M, K, N, G = 1000, 320, 700, 8   # K and N leave remainders for 128-wide tiles


def _export(fn, platform, *args):
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()


def _pallas_gmm(lhs, rhs, sizes, tiling=None):
    return gmm(lhs, rhs, sizes, backend="pallas", interpret=False, tiling=tiling)


def _loss(lhs, rhs, sizes):
    return jnp.sum(_pallas_gmm(lhs, rhs, sizes).astype(jnp.float32) ** 2)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gmm_forward_and_grad_export(platform, dtype):
    args = (S((M, K), dtype), S((G, K, N), dtype), S((G,), jnp.int32))
    forward = _export(_pallas_gmm, platform, *args)
    grad = _export(jax.grad(_loss, argnums=(0, 1)), platform, *args)
    assert TARGET[platform] in forward
    # forward + d_lhs (gmm with transposed rhs) + d_rhs (tgmm): three kernels.
    assert grad.count(f"custom_call @{TARGET[platform]}") == 3


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_tgmm_and_int8_forward_and_grad_export(platform):
    lhs, sizes = S((M, K), jnp.bfloat16), S((G,), jnp.int32)
    weight_grad = _export(lambda a, b, s: tgmm(a, b, s, backend="pallas", interpret=False),
                          platform, lhs, S((M, N), jnp.bfloat16), sizes)
    int8 = _export(lambda a, q, sc, s: gmm_int8(a, q, sc, s, backend="pallas", interpret=False),
                   platform, lhs, S((G, K, N), jnp.int8), S((G, N), jnp.float32), sizes)
    int8_grad = _export(jax.grad(lambda a, q, sc, s: jnp.sum(gmm_int8(
        a, q, sc, s, backend="pallas", interpret=False).astype(jnp.float32) ** 2), argnums=(0, 2)),
        platform, lhs, S((G, K, N), jnp.int8), S((G, N), jnp.float32), sizes)
    assert TARGET[platform] in weight_grad and TARGET[platform] in int8
    assert int8_grad.count(f"custom_call @{TARGET[platform]}") == 3


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_decode_sized_gmm_grad_exports(platform):
    """A handful of rows (serving decode): tiles larger than M must still lower."""
    args = (S((3, K), jnp.bfloat16), S((G, K, N), jnp.bfloat16), S((G,), jnp.int32))
    assert TARGET[platform] in _export(jax.grad(_loss, argnums=(0, 1)), platform, *args)


def test_explicit_tiling_exports_for_tpu():
    args = (S((M, K), jnp.bfloat16), S((G, K, N), jnp.bfloat16), S((G,), jnp.int32))
    module = _export(lambda a, b, s: _pallas_gmm(a, b, s, tiling=(256, 128, 256)), "tpu", *args)
    assert TARGET["tpu"] in module


@pytest.mark.parametrize("tiling, message", [
    ((100, 128, 128), "tiling.tm=100 is not legal on TPU"),   # not a multiple of 16 (bf16)
    ((128, 200, 128), "tiling.tk=200 is not legal on TPU"),
])
def test_tiling_illegal_for_hardware_is_a_value_error(tiling, message):
    args = (S((M, K), jnp.bfloat16), S((G, K, N), jnp.bfloat16), S((G,), jnp.int32))
    with pytest.raises(ValueError, match=message):
        _export(lambda a, b, s: _pallas_gmm(a, b, s, tiling=tiling), "tpu", *args)


def test_a_tiling_is_checked_only_for_the_platform_it_is_lowered_for():
    """tm=48 is legal on TPU, not on the GPU (a power of 2 there): each kernel is traced only
    where the code is lowered for its platform, so only the GPU export refuses it."""
    args = (S((M, K), jnp.bfloat16), S((G, K, N), jnp.bfloat16), S((G,), jnp.int32))
    tiled = functools.partial(_pallas_gmm, tiling=(48, 128, 128))
    assert TARGET["tpu"] in _export(tiled, "tpu", *args)
    with pytest.raises(ValueError, match="tiling.tm=48 is not legal for the GPU"):
        _export(tiled, "cuda", *args)


def test_compiled_kernel_run_on_cpu_is_an_error_not_the_reference():
    lhs, rhs, sizes = jnp.ones((8, 16)), jnp.ones((2, 16, 8)), jnp.array([3, 5])
    for op in (lambda: gmm(lhs, rhs, sizes, backend="pallas", interpret=False),
               lambda: tgmm(lhs, jnp.ones((8, 8)), sizes, backend="pallas", interpret=False)):
        with pytest.raises(NotImplementedError, match="run on TPU/GPU only.*interpret=True"):
            jax.block_until_ready(op())


@pytest.mark.parametrize("tm, tk, tn, field", [
    (0, 8, 8, "tm"), (8, -1, 8, "tk"), (8, 8, 2.5, "tn"), (True, 8, 8, "tm")])
def test_gmm_tiling_rejects_bad_values(tm, tk, tn, field):
    with pytest.raises(ValueError, match=f"GmmTiling.{field} must be a positive int"):
        GmmTiling(tm, tk, tn)


def test_bad_tiling_argument_is_a_value_error():
    lhs, rhs, sizes = jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.array([2, 2])
    with pytest.raises(ValueError, match="tiling must be None, a GmmTiling"):
        gmm(lhs, rhs, sizes, backend="pallas", tiling=(8, 8))
    with pytest.raises(ValueError, match="GmmTiling.tk must be a positive int"):
        gmm(lhs, rhs, sizes, backend="pallas", tiling=(8, 0, 8))


@pytest.mark.parametrize("call, message", [
    (lambda: gmm(jnp.ones((4, 3)), jnp.ones((2, 5, 6)), jnp.array([2, 2])),
     "contraction dims differ: lhs is \\[M, K=3\\] but rhs is \\[G, K=5, N\\]"),
    (lambda: gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 6)), jnp.array([1, 1, 2])),
     "group_sizes has length 3 but there are 2 groups"),
    (lambda: gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 6)), jnp.array([2.0, 2.0])),
     "group_sizes must have an integer dtype, got float32"),
    (lambda: gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 6), jnp.int8), jnp.array([2, 2])),
     "lhs and rhs must be floating point"),
    (lambda: gmm(jnp.ones((4, 3)), jnp.ones((3, 6)), jnp.array([4])),
     "rhs must be 3-D"),
    (lambda: gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 6)), jnp.array([2, 2]), backend="cuda"),
     "backend must be one of"),
    (lambda: tgmm(jnp.ones((4, 3)), jnp.ones((5, 6)), jnp.array([2, 2])),
     "lhs has 4 rows but grad has 5"),
    (lambda: tgmm(jnp.ones((4, 3), jnp.int32), jnp.ones((4, 6)), jnp.array([2, 2])),
     "tgmm: lhs and grad must be floating point, got int32 and float32"),
    (lambda: gmm_int8(jnp.ones((4, 3), jnp.int32), jnp.ones((2, 3, 6), jnp.int8), jnp.ones((2, 6)),
                      jnp.array([2, 2])),
     "gmm_int8: lhs must be floating point, got int32"),
    (lambda: gmm_int8(jnp.ones((4, 3)), jnp.ones((2, 3, 6)), jnp.ones((2, 6)), jnp.array([2, 2])),
     "rhs must be int8"),
    (lambda: gmm_int8(jnp.ones((4, 3)), jnp.ones((2, 3, 6), jnp.int8), jnp.ones((2, 3)),
                      jnp.array([2, 2])),
     "rhs_scale must have shape \\[G, N\\] = \\(2, 6\\)"),
])
def test_bad_operands_are_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
