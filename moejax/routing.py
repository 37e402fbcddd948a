"""Routers and balancing losses.

Pure functions do the math (always in float32, whatever the compute dtype);
``Router`` owns the parameters. Shapes: T tokens, E experts, K = top_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from moejax.config import MoEConfig


class RouterBias(nnx.Variable):
    """Per-expert selection bias (DeepSeek-V3). Not trained by the optimizer:
    updated by :func:`update_router_bias` from the observed expert load."""


def group_limited_mask(scores_TE: Float[Array, "T E"], n_group: int, topk_group: int
                       ) -> Float[Array, "T E"]:
    """Keep only experts in the ``topk_group`` best groups; the rest become -inf.

    A group's score is the sum of its two best expert scores (DeepSeek-V3);
    with one expert per group it is that expert's score.
    """
    num_tokens, num_experts = scores_TE.shape
    if not (1 <= n_group <= num_experts and num_experts % n_group == 0):
        raise ValueError(f"n_group={n_group} must divide num_experts={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if n_group == 1:
        return scores_TE
    per_group = num_experts // n_group
    scores_TGe = scores_TE.reshape(num_tokens, n_group, per_group)
    best_two = jax.lax.top_k(scores_TGe, min(2, per_group))[0]
    group_score_TG = best_two.sum(axis=-1)
    _, top_groups_TK = jax.lax.top_k(group_score_TG, topk_group)
    keep_TG = jnp.zeros((num_tokens, n_group), bool).at[
        jnp.arange(num_tokens)[:, None], top_groups_TK].set(True)
    keep_TE = jnp.repeat(keep_TG, per_group, axis=1)
    return jnp.where(keep_TE, scores_TE, -jnp.inf)


def _select_experts(choice_TE: Float[Array, "T E"], top_k: int, n_group: int, topk_group: int
                    ) -> Int[Array, "T K"]:
    """The top_k experts by choice score within the ``topk_group`` best groups."""
    num_experts = choice_TE.shape[-1]
    choice_TE = group_limited_mask(choice_TE, n_group, topk_group)
    allowed = topk_group * (num_experts // n_group)
    if not 1 <= top_k <= allowed:   # past the allowed experts top_k would pick masked ones
        raise ValueError(f"top_k={top_k} must be in [1, {allowed}] (topk_group={topk_group} of "
                         f"n_group={n_group} groups hold {allowed} of the {num_experts} experts)")
    return jax.lax.top_k(choice_TE, top_k)[1]


def _normalise(gates_TK: Float[Array, "T K"], norm_topk_prob: bool) -> Float[Array, "T K"]:
    """Renormalise the k gates to sum to 1 when asked.

    With k = 1 the result is exactly 1 with zero derivative; computing p / p
    would only add float32 cancellation noise to the router gradient.
    """
    if not norm_topk_prob:
        return gates_TK
    if gates_TK.shape[-1] == 1:
        return jnp.ones_like(gates_TK)
    return gates_TK / (gates_TK.sum(axis=-1, keepdims=True) + 1e-20)


def softmax_topk(logits_TE: Float[Array, "T E"], top_k: int, *, norm_topk_prob: bool,
                 n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0
                 ) -> tuple[Float[Array, "T K"], Int[Array, "T K"], Float[Array, "T E"]]:
    """Softmax over all experts, then top-k (Mixtral, Qwen-MoE, OLMoE).

    Returns (gates_TK, experts_TK, probs_TE). With ``norm_topk_prob`` the k
    gates are renormalised to sum to 1.
    """
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    experts_TK = _select_experts(probs_TE, top_k, n_group, topk_group)
    gates_TK = _normalise(jnp.take_along_axis(probs_TE, experts_TK, axis=-1), norm_topk_prob)
    return gates_TK * routed_scaling_factor, experts_TK, probs_TE


def sigmoid_topk(logits_TE: Float[Array, "T E"], bias_E: Float[Array, "E"], top_k: int, *,
                 norm_topk_prob: bool, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0
                 ) -> tuple[Float[Array, "T K"], Int[Array, "T K"], Float[Array, "T E"]]:
    """Sigmoid scores; the bias steers selection only (DeepSeek-V3).

    1. scores = sigmoid(logits); choice = scores + bias (bias not in gates).
    2. group-limited mask on the choice scores, then top-k experts.
    3. gates = unbiased scores of the chosen experts, renormalised if asked,
       times ``routed_scaling_factor``.
    Returns (gates_TK, experts_TK, probs_TE) with probs the normalised scores
    (used by the balance loss).
    """
    scores_TE = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
    choice_TE = scores_TE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))[None, :]
    experts_TK = _select_experts(choice_TE, top_k, n_group, topk_group)
    gates_TK = _normalise(jnp.take_along_axis(scores_TE, experts_TK, axis=-1), norm_topk_prob)
    probs_TE = scores_TE / scores_TE.sum(axis=-1, keepdims=True)
    return gates_TK * routed_scaling_factor, experts_TK, probs_TE


def expert_fraction(experts_TK: Int[Array, "T K"], num_experts: int) -> Float[Array, "E"]:
    """Fraction of the T*K (token, slot) assignments that go to each expert.

    Counted in int32: a float32 count stops at 2**24 (adding 1.0 no longer changes it).
    """
    counts_E = jnp.bincount(experts_TK.reshape(-1), length=num_experts)
    return counts_E.astype(jnp.float32) / experts_TK.size


def load_balance_loss(probs_TE: Float[Array, "T E"], experts_TK: Int[Array, "T K"],
                      num_sequences: int = 1) -> Float[Array, ""]:
    """Switch load-balance loss ``E * sum_i f_i * P_i``.

    f_i: fraction of assignments to expert i; P_i: mean router probability.
    With ``num_sequences`` > 1 the loss is computed per sequence (tokens are
    sequence-major) and averaged (DeepSeek-V3's sequence-wise variant).
    """
    num_tokens, num_experts = probs_TE.shape
    if not (num_sequences >= 1 and num_tokens % num_sequences == 0):
        raise ValueError(f"num_sequences={num_sequences} must divide the {num_tokens} tokens")
    probs_SLE = probs_TE.reshape(num_sequences, num_tokens // num_sequences, num_experts)
    experts_SLK = experts_TK.reshape(num_sequences, num_tokens // num_sequences, -1)
    f_SE = jax.vmap(expert_fraction, in_axes=(0, None))(experts_SLK, num_experts)
    p_SE = probs_SLE.mean(axis=1)
    return num_experts * jnp.mean(jnp.sum(f_SE * p_SE, axis=-1))


def z_loss(logits_TE: Float[Array, "T E"]) -> Float[Array, ""]:
    """Router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def update_router_bias(bias_E: Float[Array, "E"], load_E: Float[Array, "E"], rate: float
                       ) -> Float[Array, "E"]:
    """Aux-loss-free balancing: ``bias += rate * sign(mean_load - load)`` (mean over experts;
    leading axes, e.g. the layers of a scanned group, are independent rows)."""
    return bias_E + rate * jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)


class Router(nnx.Module):
    """Linear router ``logits = x @ w`` (float32), then softmax or sigmoid top-k.

    1. logits_TE = x_TD @ w_DE in float32.
    2. softmax_topk or sigmoid_topk (with the selection bias) -> gates, experts.
    3. balance loss (batch or sequence), z-loss, expert load.
    """

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(stddev=cfg.d_model ** -0.5)
        self.kernel = nnx.Param(init(rngs.params(), (cfg.d_model, cfg.num_experts), jnp.float32),
                                logical_axes=("embed", None))
        if cfg.uses_router_bias:
            self.bias = RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32),
                                   logical_axes=(None,))

    def __call__(self, x_TD: Float[Array, "T D"], num_sequences: int = 1):
        cfg = self.cfg
        logits_TE = jnp.einsum("td,de->te", x_TD.astype(jnp.float32), self.kernel[...],
                               precision=jax.lax.Precision.HIGHEST)
        common = dict(norm_topk_prob=cfg.norm_topk_prob, n_group=cfg.n_group,
                      topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor)
        if cfg.router == "softmax":
            gates_TK, experts_TK, probs_TE = softmax_topk(logits_TE, cfg.top_k, **common)
        else:
            gates_TK, experts_TK, probs_TE = sigmoid_topk(logits_TE, self.bias[...], cfg.top_k,
                                                          **common)
        seqs = num_sequences if cfg.aux_loss_type == "sequence" else 1
        stats = {
            "aux_loss": load_balance_loss(probs_TE, experts_TK, seqs),
            "z_loss": z_loss(logits_TE),
            "expert_load": expert_fraction(experts_TK, cfg.num_experts),
        }
        return gates_TK, experts_TK, stats
