"""Public entry points: validate, pick a backend and call it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels_pallas.gmm.reference import gmm_int8_reference, gmm_reference, tgmm_reference
from kernels_pallas.gmm.tiling import GmmTiling
from kernels_pallas.gmm.validate import check_floating, check_gmm, check_int8, check_tgmm
from kernels_pallas.gmm.vjp import (KernelChoice, gmm_bwd, gmm_int8_bwd, gmm_int8_pallas,
                                    gmm_pallas, run_gmm, run_tgmm, tgmm_bwd, tgmm_pallas)
from kernels_pallas.gmm.xla import gmm_int8_xla, gmm_xla, gmm_xla_bwd, tgmm_xla
from kernels_pallas.lowering import per_lowering_platform
from kernels_pallas.shard_map_types import match_varying

BACKENDS = ("auto", "pallas", "xla", "reference")


def _resolve(op, backend, tiling, interpret):
    """-> (backend, KernelChoice) with interpret=None made concrete. 'auto' becomes
    'pallas' when running on TPU/GPU; on any other host it stays 'auto', resolved
    per lowering platform by :func:`_auto_per_platform`."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    on_accelerator = jax.default_backend() in ("tpu", "gpu")
    if backend == "auto" and on_accelerator:
        backend = "pallas"
    if interpret is None:
        interpret = not on_accelerator
    return backend, KernelChoice(tiling=GmmTiling.coerce(tiling), interpret=bool(interpret))


def _arrays(*operands):
    """Array-likes as arrays, as jnp functions take them: a list of group sizes was
    refused as "must be 1-D [G], got shape ()"."""
    return tuple(jnp.asarray(x) for x in operands)


def _clamped_sizes(group_sizes, num_rows):
    """int32 sizes clipped to [0, M], the same groups on every backend: negative sizes
    count as 0 (the XLA tile loop's rule; the Pallas metadata and ragged_dot gave garbage
    or NaN rows for them) and a size past M is cut at M, as its rows would be. Clipped
    before the cast: the kernels add sizes in int32, where an int64 or uint32 size of
    2**31 or more wrapped around (to a negative or small size, silently wrong rows)."""
    if jnp.dtype(group_sizes.dtype).itemsize < 4:  # narrow: widen first, M may not fit
        group_sizes = group_sizes.astype(jnp.int32)
    return jnp.clip(group_sizes, 0, num_rows).astype(jnp.int32)


def _auto_per_platform(xla_fn, pallas_fwd, pallas_bwd, choice, differentiable, *args,
                       xla_bwd=None):
    """backend='auto' traced on a host without TPU/GPU: ``xla_fn(*args)`` where the function
    is lowered for CPU, the compiled Pallas kernel where it is lowered for TPU or GPU
    (``jax.export(..., platforms=['tpu'])`` from this host carries the kernel; a plain
    ``jax.jit`` here never traces it: kernels_pallas.lowering). Differentiable in the args
    flagged in ``differentiable``: on CPU by ``xla_bwd(*args, cotangent)`` if given, else by
    autodiff of ``xla_fn`` (the flagged args' cotangents); on TPU/GPU by the kernels' own
    backward ``pallas_bwd(choice, args, cotangent)`` (one per arg, None for the others).
    """
    kernels = {p: dataclasses.replace(choice, interpret=False, platform=p) for p in ("tpu", "gpu")}
    wrt = [i for i, d in enumerate(differentiable) if d]

    def forward(*a):
        return per_lowering_platform(xla_fn, {
            p: functools.partial(pallas_fwd, c) for p, c in kernels.items()}, *a)

    def xla_backward(*a_g):
        *a, g = a_g
        if xla_bwd is not None:
            return xla_bwd(*a, g)

        def of_wrt(*d):
            return xla_fn(*[d[wrt.index(i)] if i in wrt else x for i, x in enumerate(a)])
        return jax.vjp(of_wrt, *[a[i] for i in wrt])[1](g)

    def pallas_backward(c, *a_g):   # None for the other args: no leaf, like xla_backward
        return pallas_bwd(c, a_g[:-1], a_g[-1])

    @jax.custom_vjp
    def run(*a):
        return forward(*a)

    def backward(a, g):
        grads = iter(per_lowering_platform(xla_backward, {
            p: functools.partial(pallas_backward, c) for p, c in kernels.items()}, *a, g))
        return tuple(next(grads) if d else None for d in differentiable)

    run.defvjp(lambda *a: (forward(*a), a), backward)
    return run(*args)


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, tiling=None,
        backend="auto", interpret=None):
    """Grouped matmul; rows of ``lhs`` are grouped contiguously, group g uses ``rhs[g]``.

    lhs [M,K], rhs [G,K,N], group_sizes [G] integer -> [M,N]; rows past
    sum(group_sizes) are zero, groups reaching past row M are cut there, and
    negative sizes count as 0. Differentiable in lhs and rhs.
    backend: 'pallas' (TPU/GPU kernel; interpret mode elsewhere), 'xla' (the
    fast XLA path used on CPU), 'reference' (jax.lax.ragged_dot), 'auto'
    (Pallas on TPU/GPU, 'xla' on CPU, chosen per lowering platform, so an
    export for TPU/GPU from a CPU host carries the compiled kernel).
    tiling: None (heuristic), a GmmTiling or (tm, tk, tn); used by 'pallas'.
    interpret: None = interpret mode unless running on TPU/GPU; False on a CPU host lowers
    the compiled kernels for export to TPU/GPU (run here, a NotImplementedError).
    """
    lhs, rhs, group_sizes = _arrays(lhs, rhs, group_sizes)
    check_gmm("gmm", lhs, rhs, group_sizes)
    backend, choice = _resolve("gmm", backend, tiling, interpret)
    check_floating("gmm", " (for int8 weights use gmm_int8)", lhs=lhs, rhs=rhs)
    dtype = jnp.result_type(lhs, rhs)
    lhs, rhs, group_sizes = match_varying(lhs.astype(dtype), rhs.astype(dtype),
                                          _clamped_sizes(group_sizes, lhs.shape[0]))
    out_dtype = jnp.dtype(preferred_element_type or dtype)
    if 0 in lhs.shape or 0 in rhs.shape:   # nothing to multiply (no rows, width or groups)
        return jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
    if backend == "pallas":
        return gmm_pallas(lhs, rhs, group_sizes, out_dtype, choice)
    if backend == "auto":
        return _auto_per_platform(
            lambda a, b, s: gmm_xla(a, b, s, preferred_element_type),
            lambda c, a, b, s: run_gmm(c, a, b, s, out_dtype),
            lambda c, res, g: gmm_bwd(out_dtype, c, res, g),
            choice, (True, True, False), lhs, rhs, group_sizes,
            xla_bwd=gmm_xla_bwd)
    if backend == "xla":  # tile loop: ragged_dot runs many times under dense speed on XLA:CPU
        return gmm_xla(lhs, rhs, group_sizes, preferred_element_type)
    return gmm_reference(lhs, rhs, group_sizes, preferred_element_type)


def tgmm(lhs, grad, group_sizes, *, preferred_element_type=None, tiling=None,
         backend="auto", interpret=None):
    """Per-group ``lhs^T @ grad`` -> [G, K, N]: the weight gradient of ``gmm``.

    Groups with no rows give zeros; rows past sum(group_sizes) are ignored.
    """
    lhs, grad, group_sizes = _arrays(lhs, grad, group_sizes)
    check_tgmm("tgmm", lhs, grad, group_sizes)
    check_floating("tgmm", lhs=lhs, grad=grad)
    backend, choice = _resolve("tgmm", backend, tiling, interpret)
    dtype = jnp.result_type(lhs, grad)
    lhs, grad, group_sizes = match_varying(lhs.astype(dtype), grad.astype(dtype),
                                           _clamped_sizes(group_sizes, lhs.shape[0]))
    out_dtype = jnp.dtype(preferred_element_type or dtype)
    if 0 in lhs.shape or 0 in grad.shape or group_sizes.shape[0] == 0:
        return jnp.zeros((group_sizes.shape[0], lhs.shape[1], grad.shape[1]), out_dtype)
    if backend == "pallas":
        return tgmm_pallas(lhs, grad, group_sizes, out_dtype, choice)
    if backend == "auto":
        return _auto_per_platform(
            lambda a, g, s: tgmm_xla(a, g, s, preferred_element_type),
            lambda c, a, g, s: run_tgmm(c, a, g, s, out_dtype),
            lambda c, res, g: tgmm_bwd(out_dtype, c, res, g),
            choice, (True, True, False), lhs, grad, group_sizes)
    if backend == "xla":
        return tgmm_xla(lhs, grad, group_sizes, preferred_element_type)
    return tgmm_reference(lhs, grad, group_sizes, preferred_element_type)


def gmm_int8(lhs, rhs, rhs_scale, group_sizes, *, preferred_element_type=None, tiling=None,
             backend="auto", interpret=None):
    """Grouped matmul with weight-only int8 experts (serving; differentiable in lhs, rhs_scale).

    lhs [M,K] float, rhs [G,K,N] int8, rhs_scale [G,N] float (per output
    channel), group_sizes [G] -> [M,N] = lhs @ (rhs[g] * rhs_scale[g]) by
    groups. The Pallas kernels dequantize each weight tile in VMEM/SRAM, so the
    weights cross HBM as int8; 'xla'/'reference' dequantize up front.
    """
    lhs, rhs, rhs_scale, group_sizes = _arrays(lhs, rhs, rhs_scale, group_sizes)
    check_gmm("gmm_int8", lhs, rhs, group_sizes)
    check_int8("gmm_int8", rhs, rhs_scale)
    check_floating("gmm_int8", lhs=lhs)
    backend, choice = _resolve("gmm_int8", backend, tiling, interpret)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if 0 in lhs.shape or 0 in rhs.shape:
        return jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
    lhs, rhs, rhs_scale, group_sizes = match_varying(
        lhs, rhs, rhs_scale.astype(jnp.float32), _clamped_sizes(group_sizes, lhs.shape[0]))
    if backend == "pallas":
        return gmm_int8_pallas(lhs, rhs, rhs_scale, group_sizes, out_dtype, choice)
    if backend == "auto":
        return _auto_per_platform(
            lambda a, q, sc, s: gmm_int8_xla(a, q, sc, s, out_dtype),
            lambda c, a, q, sc, s: run_gmm(c, a, q, s, out_dtype, rhs_scale_GN=sc),
            lambda c, res, g: gmm_int8_bwd(out_dtype, c, res, g),
            choice, (True, False, True, False), lhs, rhs, rhs_scale, group_sizes)
    if backend == "xla":
        return gmm_int8_xla(lhs, rhs, rhs_scale, group_sizes, out_dtype)
    return gmm_int8_reference(lhs, rhs, rhs_scale, group_sizes, out_dtype)
