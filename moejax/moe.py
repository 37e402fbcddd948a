"""The MoE block: router + dispatch + routed experts (+ shared experts); dense SwiGLU FFN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from moejax import dispatch as dispatch_lib
from moejax import expert_parallel, sharding, validate
from moejax.config import MoEConfig
from moejax.experts import RoutedExperts, swiglu
from moejax.layers import LayerAux, LayerContext
from moejax.routing import Router, update_router_bias


def _normal(rngs: nnx.Rngs, shape, fan_in: int):
    return nnx.initializers.normal(stddev=fan_in ** -0.5)(rngs.params(), shape, jnp.float32)


def _dot(x: Array, w: Array) -> Array:
    """``x @ w`` accumulated in float32, returned in x's dtype. For bf16 this is also
    XLA:CPU's fast path (its bf16 kernel); a bf16-output dot runs as a float32 one
    between converts, ~1.6x slower."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


class SwiGLU(nnx.Module):
    """Dense SwiGLU FFN ``down(silu(x @ gate) * (x @ up))``: dense layers and shared experts."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.dtype = dtype
        self.w_gate = nnx.Param(_normal(rngs, (d_model, d_ff), d_model), logical_axes=("embed", "mlp"))
        self.w_up = nnx.Param(_normal(rngs, (d_model, d_ff), d_model), logical_axes=("embed", "mlp"))
        self.w_down = nnx.Param(_normal(rngs, (d_ff, d_model), d_ff), logical_axes=("mlp", "embed"))

    def __call__(self, x_TD: Array) -> Array:
        dt = self.dtype
        x_TD = x_TD.astype(dt)
        h_TF = swiglu(_dot(x_TD, self.w_gate[...].astype(dt)), _dot(x_TD, self.w_up[...].astype(dt)))
        return _dot(h_TF, self.w_down[...].astype(dt))


class DenseFFN(SwiGLU):
    """The 'dense' FFN kind: a SwiGLU of width ``d_ff`` under the FFN protocol
    (same parameters as :class:`SwiGLU`); reports no aux."""

    def __call__(self, x_BSD: Array, ctx: LayerContext | None = None) -> tuple[Array, LayerAux]:
        del ctx  # a dense FFN needs nothing beyond its input
        return super().__call__(x_BSD), LayerAux()


class MoE(nnx.Module):
    """Mixture-of-Experts FFN.

    1. Flatten x [B, S, D] to T = B*S tokens.
    2. Router (float32): top-k experts and gates per token; balance loss,
       z-loss and expert load.
    3. Dispatch the (token, slot) pairs to the experts with the configured
       backend ('dense' | 'capacity' | 'ragged' | 'gmm'; 'auto' picks) and
       combine the expert outputs with the gates in float32. When a mesh with
       an ``expert`` axis > 1 is set (and the sizes divide), every backend but
       the 'dense' reference runs expert-parallel (``moejax.expert_parallel``);
       on other meshes it runs per device on the local tokens.
    4. Add the shared experts (optionally scaled by a sigmoid gate per token).
    Input: floating-point x [B, S, D] with B * S > 0; integer x (TypeError) and
    an empty batch (ValueError) are refused, never cast (``moejax.validate``).
    Returns (y [B, S, D], aux), aux a :class:`~moejax.layers.LayerAux` with
    'aux_loss', 'z_loss', 'router_loss' (the two weighted by their
    coefficients), 'expert_load' [E], 'dropped_fraction', and the exchange
    figures 'ep_overflow' (pairs dropped by full expert-parallel buffers),
    'dispatch_bytes' and 'dispatch_min_bytes' (cross-device bytes of the
    forward exchange; 0 without expert parallelism).
    """

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.router = Router(cfg, rngs=rngs)
        self.experts = RoutedExperts(cfg, rngs=rngs)
        self.shared = (SwiGLU(cfg.d_model, cfg.shared_hidden, rngs=rngs, dtype=self.dtype)
                       if cfg.num_shared_experts else None)
        self.shared_gate = (nnx.Param(_normal(rngs, (cfg.d_model, 1), cfg.d_model),
                                      logical_axes=("embed", None))
                            if cfg.shared_expert_gate else None)

    @property
    def backend(self) -> str:
        return dispatch_lib.resolve_backend(self.cfg.dispatch, self.cfg.capacity_factor)

    def __call__(self, x_BSD: Float[Array, "B S D"], ctx: LayerContext | None = None
                 ) -> tuple[Float[Array, "B S D"], LayerAux]:
        del ctx  # routing looks at the hidden state only
        cfg = self.cfg
        validate.moe_input(x_BSD, cfg.d_model)
        batch, seq, d_model = x_BSD.shape
        x_TD = x_BSD.reshape(batch * seq, d_model)
        gates_TK, experts_TK, router_stats = self.router(x_TD, num_sequences=batch)
        out_TD, stats = self._routed(x_TD.astype(self.dtype), gates_TK, experts_TK)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                gate_T1 = jax.nn.sigmoid(x_TD.astype(jnp.float32) @ self.shared_gate[...])
                shared_TD = (shared_TD.astype(jnp.float32) * gate_T1).astype(self.dtype)
            out_TD = out_TD + shared_TD
        router_loss = (cfg.aux_loss_coef * router_stats["aux_loss"]
                       + cfg.z_loss_coef * router_stats["z_loss"])
        aux = LayerAux(router_loss=router_loss, **router_stats).merged(stats)
        return out_TD.reshape(batch, seq, d_model).astype(x_BSD.dtype), aux

    def _routed(self, x_TD, gates_TK, experts_TK):
        """Routed experts, expert-parallel when the mesh allows -> (out_TD, stats)."""
        cfg, backend = self.cfg, self.backend
        experts = self.experts.weights()
        layout = expert_parallel.layout_for(sharding.current_mesh(), experts, x_TD.shape[0])
        if backend != "dense" and layout is not None:
            return expert_parallel.expert_parallel_dispatch(
                x_TD, gates_TK, experts_TK, experts, layout,
                capacity_factor=cfg.capacity_factor, exchange=cfg.ep_exchange, backend=backend)
        out_TD, dropped = dispatch_lib.dispatch_experts(
            backend, x_TD, gates_TK, experts_TK, experts, capacity_factor=cfg.capacity_factor)
        zero = jnp.zeros((), jnp.float32)
        return out_TD, LayerAux(dropped_fraction=dropped, ep_overflow=zero,
                                dispatch_bytes=zero, dispatch_min_bytes=zero)

    def update_bias(self, expert_load_E: Float[Array, "E"]) -> None:
        """Aux-loss-free balancing step (outside the optimizer); no-op without a bias."""
        if self.cfg.uses_router_bias and self.cfg.bias_update_rate > 0:
            self.router.bias[...] = update_router_bias(self.router.bias[...], expert_load_E,
                                                       self.cfg.bias_update_rate)


def moe_backends(cfg: MoEConfig, mesh=None, rules: sharding.ShardingRules | None = None) -> str:
    """One line for a log: the dispatch backend, grouped-matmul kernel and expert-parallel
    exchange an MoE layer of ``cfg`` runs with on ``mesh`` (None: one device)."""
    backend = dispatch_lib.resolve_backend(cfg.dispatch, cfg.capacity_factor)
    how = f" ({cfg.dispatch})" if cfg.dispatch != backend else ""
    ep = expert_parallel.describe(mesh, cfg.num_experts, cfg.ep_exchange, cfg.capacity_factor, rules)
    return f"moe dispatch {backend}{how}: {dispatch_lib.describe_backend(backend)}; {ep}"

