"""One function per lowering platform, traced only where it is lowered.

``jax.lax.platform_dependent`` traces every branch whatever the platform, and
autodiff then linearizes and transposes all of them: on a CPU host the TPU and
GPU Pallas kernels of every grouped matmul were traced (and differentiated) for
nothing, which doubled the time to trace a MoE model's train step there.

:func:`per_lowering_platform` binds one primitive instead. The CPU function is
traced when it is called (its jaxpr gives the output types); an accelerator's
function is traced by the primitive's lowering rule for that platform, so only
when the code is lowered for it: ``jax.jit`` on a CPU host never traces the
kernels, ``jax.export(..., platforms=["tpu"])`` from the same host carries the
TPU kernel. The primitive has no autodiff rule (callers wrap it in a
``custom_vjp`` whose backward is another :func:`per_lowering_platform`); it
batches by vmapping each function.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.extend.core import ClosedJaxpr, Primitive, jaxpr_as_fun
from jax.interpreters import batching, mlir

# accelerator_fns keys -> the lowering platforms each serves ('gpu': KernelChoice's name)
ACCELERATORS = {"tpu": ("tpu",), "cuda": ("cuda",), "rocm": ("rocm",), "gpu": ("cuda", "rocm")}

per_platform_p = Primitive("moejax_per_lowering_platform")
per_platform_p.multiple_results = True


def per_lowering_platform(cpu_fn: Callable, accelerator_fns: dict[str, Callable], *args,
                          cpu_error: str | None = None):
    """``cpu_fn(*args)`` where lowered for CPU, ``accelerator_fns[p](*args)`` where lowered for
    p ('tpu', 'cuda', 'rocm', or 'gpu' for both of these; a missing one cannot be lowered).

    ``args`` are arrays or pytrees of them (None for an absent operand); every function takes
    them, closes over no traced value and returns a pytree of arrays whose leaves have the
    shapes and dtypes of ``cpu_fn``'s (None, no leaf, may stand for an absent output); the
    result has ``cpu_fn``'s structure. With ``cpu_error`` the CPU lowering raises
    NotImplementedError with that message instead (``cpu_fn`` then only gives the types).
    """
    unknown = set(accelerator_fns) - set(ACCELERATORS)
    if unknown:
        raise ValueError(f"per_lowering_platform: unknown platforms {sorted(unknown)}; "
                         f"known: {sorted(ACCELERATORS)}")
    leaves, tree = jax.tree.flatten(args)

    def on_leaves(fn):
        return lambda *x: fn(*jax.tree.unflatten(tree, x))
    cpu_jaxpr, out_shapes = jax.make_jaxpr(on_leaves(cpu_fn), return_shape=True)(*leaves)
    if any(isinstance(c, jax.core.Tracer) for c in cpu_jaxpr.consts):
        raise ValueError("per_lowering_platform: cpu_fn closes over a traced value; pass it "
                         "as an argument")
    if cpu_jaxpr.effects:   # the primitive declares none: they would be dropped or reordered
        raise ValueError(f"per_lowering_platform: cpu_fn has side effects {cpu_jaxpr.effects}")
    by_platform = tuple(sorted((platform, on_leaves(fn)) for key, fn in accelerator_fns.items()
                               for platform in ACCELERATORS[key]))
    outs = per_platform_p.bind(*leaves, cpu_jaxpr=cpu_jaxpr, cpu_error=cpu_error,
                               accelerators=by_platform)
    return jax.tree.unflatten(jax.tree.structure(out_shapes), outs)


def _abstract_eval(*avals, cpu_jaxpr: ClosedJaxpr, **_):
    del avals
    return cpu_jaxpr.out_avals


def _lowering(platform: str):
    def rule(ctx, *args, cpu_jaxpr: ClosedJaxpr, cpu_error: str | None, accelerators):
        if platform == "cpu" and cpu_error:
            raise NotImplementedError(cpu_error)
        if platform == "cpu":
            return mlir.lower_fun(jaxpr_as_fun(cpu_jaxpr), multiple_results=True)(ctx, *args)
        fns = dict(accelerators)
        if platform not in fns:
            raise NotImplementedError(f"per_lowering_platform: no function for {platform!r} "
                                      f"(have cpu and {sorted(fns)})")
        want = [(a.shape, a.dtype) for a in cpu_jaxpr.out_avals]

        def checked(*a):
            outs = jax.tree.leaves(fns[platform](*a))
            got = [(o.shape, o.dtype) for o in outs]
            if got != want:
                raise TypeError(f"per_lowering_platform: the {platform} function returns "
                                f"{got}, the cpu function {want}")
            return outs
        return mlir.lower_fun(checked, multiple_results=True)(ctx, *args)
    return rule


def _batched(fn: Callable, dims) -> Callable:
    return jax.vmap(lambda *a: jax.tree.leaves(fn(*a)), in_axes=tuple(dims))   # None: not batched


def _batch(axis_data, args, dims, *, cpu_jaxpr: ClosedJaxpr, cpu_error, accelerators):
    del axis_data   # the size comes with the batched args (some dim is not None here)
    outs = per_lowering_platform(_batched(jaxpr_as_fun(cpu_jaxpr), dims),
                                 {p: _batched(f, dims) for p, f in accelerators}, *args,
                                 cpu_error=cpu_error)
    return outs, (0,) * len(outs)


def _impl(*args, **params):
    return jax.jit(lambda *a: per_platform_p.bind(*a, **params))(*args)


per_platform_p.def_impl(_impl)
per_platform_p.def_abstract_eval(_abstract_eval)
batching.fancy_primitive_batchers[per_platform_p] = _batch
for _platform in ("cpu", "tpu", "cuda", "rocm"):
    mlir.register_lowering(per_platform_p, _lowering(_platform), platform=_platform)
