"""The train and eval steps: pure functions over (params, opt_state, nonparam, batch).

``params`` and ``nonparam`` are pure dicts of arrays split from the model
(``nnx.Param`` vs everything else, e.g. ``moejax.routing.RouterBias``): the
optimizer only ever sees ``params``. One train step:

1. loss = cross-entropy(next byte/token) + router losses (aux and z loss,
   already weighted by the MoE config's coefficients).
2. grads, global grad norm, optimizer update (clip, AdamW, schedule, groups).
3. aux-loss-free balancing: router biases nudged from this step's expert load.
4. If the loss, the gradients or the updated parameters are not finite,
   every state is kept as it was (the host then stops the run), so a bad
   step never reaches a checkpoint.

The steps are jitted with shardings from a logical-axis rules value
(``moejax.sharding.DEFAULT_RULES`` unless given) and trace the model under
the same rules; they donate their state. On one device the mesh is 1x1x1x1
and the code is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax import sharding
from moejax.model import Transformer


def split_model(model: Transformer):
    """-> (graphdef, params, nonparam) with the two states as pure dicts of arrays."""
    graphdef, params, nonparam = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(nonparam)


def merge_model(graphdef, params: dict, nonparam: dict) -> Transformer:
    return nnx.merge(graphdef, params, nonparam)


def lm_loss(logits_BSV, targets_BS):
    """Mean next-token cross-entropy in nats (float32 logits)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BSV, targets_BS).mean()


def train_step_fn(graphdef, tx: optax.GradientTransformation,
                  rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> Callable:
    def train_step(params, opt_state, nonparam, batch_BS1):
        with sharding.use_rules(rules):
            return _train_step(params, opt_state, nonparam, batch_BS1)

    def _train_step(params, opt_state, nonparam, batch_BS1):
        inputs_BS, targets_BS = batch_BS1[:, :-1], batch_BS1[:, 1:]

        def loss_fn(params):
            logits_BSV, aux = merge_model(graphdef, params, nonparam)(inputs_BS)
            loss = lm_loss(logits_BSV, targets_BS)
            return loss + aux["router_loss"], (loss, aux)

        (total, (loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        model = merge_model(graphdef, new_params, nonparam)
        model.update_router_biases(jax.lax.stop_gradient(aux["expert_load"]))
        new_nonparam = split_model(model)[2]

        # finite loss and gradients can still give non-finite parameters: an update that
        # overflows (an lr beyond float32 is inf, and inf * 0 is NaN)
        params_finite = jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new_params)]).all()
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm) & params_finite
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = {"loss": loss, "total_loss": total, "aux_loss": aux["aux_loss"],
                   "z_loss": aux["z_loss"], "router_loss": aux["router_loss"],
                   "dropped_fraction": aux["dropped_fraction"], "expert_load": aux["expert_load"],
                   "grad_norm": grad_norm, "finite": finite, "params_finite": params_finite}
        return (keep(new_params, params), keep(new_opt_state, opt_state),
                keep(new_nonparam, nonparam), metrics)

    return train_step


def eval_step_fn(graphdef, rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> Callable:
    def eval_step(params, nonparam, batch_BS1):
        with sharding.use_rules(rules):
            logits_BSV, _ = merge_model(graphdef, params, nonparam)(batch_BS1[:, :-1])
        return lm_loss(logits_BSV, batch_BS1[:, 1:])

    return eval_step


@dataclass(frozen=True)
class Shardings:
    """Where every piece of the train state and the batch lives on the mesh."""

    mesh: Mesh
    params: Any
    opt_state: Any
    nonparam: Any
    batch: NamedSharding
    replicated: NamedSharding
    rules: sharding.ShardingRules = sharding.DEFAULT_RULES


def batch_parallelism(mesh: Mesh, rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> int:
    size = 1
    for axis in rules["batch"]:
        size *= mesh.shape.get(axis, 1)
    return size


def variable_shardings(state: nnx.State, mesh: Mesh,
                       rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> dict:
    """Pure dict of NamedShardings from the logical-axis rules (abstract values work too)."""
    return nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))


def make_shardings(mesh: Mesh, model: Transformer, tx, params, batch_shape,
                   rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> Shardings:
    _, param_state, nonparam_state = nnx.split(model, nnx.Param, ...)
    replicated = NamedSharding(mesh, P())
    param_sh = variable_shardings(param_state, mesh, rules)
    nonparam_sh = variable_shardings(nonparam_state, mesh, rules)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt_abstract, param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    batch_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), batch_shape, mesh,
                                                            rules))
    return Shardings(mesh, param_sh, opt_sh, nonparam_sh, batch_sh, replicated, rules)


def jit_train_step(graphdef, tx, sh: Shardings) -> Callable:
    return jax.jit(train_step_fn(graphdef, tx, sh.rules),
                   in_shardings=(sh.params, sh.opt_state, sh.nonparam, sh.batch),
                   out_shardings=(sh.params, sh.opt_state, sh.nonparam, sh.replicated),
                   donate_argnums=(0, 1, 2))


def jit_eval_step(graphdef, sh: Shardings) -> Callable:
    return jax.jit(eval_step_fn(graphdef, sh.rules), in_shardings=(sh.params, sh.nonparam, sh.batch),
                   out_shardings=sh.replicated)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs (with shardings) of ``tree``: the target of a restore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
