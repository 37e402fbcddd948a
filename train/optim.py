"""The optimizer: global-norm clipping, AdamW with warmup + cosine, parameter groups.

Parameter groups are ``REGEX=LR_MULT`` rules matched (``re.search``, first
rule wins) against a parameter's path such as ``layers/0/ffn/experts/w_up``;
the group's updates (weight decay included) are scaled by LR_MULT, exactly as
if it had its own AdamW with ``lr * LR_MULT``.

Memory-layer value tables (parameters named ``moejax.memory.VALUES``, i.e.
``mem_values``: product-key values, Engram n-gram rows) form a group of their
own by default: learning rate ``lr * memory_lr_mult`` (10x, as "Memory Layers
at Scale" uses for its values) and no weight decay (each row is read by few
tokens, so decay would erase rarely read facts between their updates). An
explicit ``--param-group`` rule that matches them takes precedence.
Weight decay applies to matrices only (ndim >= 2), never to norm scales; the
leading layer axis of scanned layers (``stacks/...``) does not count.
"""

from __future__ import annotations

import jax
import optax

from moejax.memory import VALUES
from train.config import TrainConfig, TrainError, parse_param_groups


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def param_path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def is_memory_value(path) -> bool:
    """A memory layer's value table (its own lr, no weight decay)."""
    return bool(path) and str(getattr(path[-1], "key", path[-1])) == VALUES


def lr_multipliers(params, rules: tuple[str, ...], memory_mult: float = 1.0):
    """Tree of per-parameter LR multipliers; every rule must match something.
    Memory value tables no rule matches get ``memory_mult``."""
    groups = parse_param_groups(rules)
    used = [False] * len(groups)

    def multiplier(path, _):
        name = param_path(path)
        for i, (pattern, mult) in enumerate(groups):
            if pattern.search(name):
                used[i] = True
                return mult
        return memory_mult if is_memory_value(path) else 1.0

    mults = jax.tree_util.tree_map_with_path(multiplier, params)
    unused = [rule for rule, u in zip(rules, used) if not u]
    if unused:
        raise TrainError(f"--param-group {unused[0]!r} matches no parameter; paths look like "
                         f"{param_path(jax.tree_util.tree_flatten_with_path(params)[0][-1][0])!r}")
    return mults


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiply each update by its (static) per-parameter factor."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """clip -> Adam moments -> decoupled weight decay -> schedule -> group multipliers."""
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, p: (p.ndim - (param_path(path).startswith("stacks/")) >= 2
                         and not is_memory_value(path)), params)
    # A fixed chain whatever the flags: the optimizer state's tree paths (opt_state/1/mu/...)
    # then stay the same, so a run may resume with another --clip-norm (0 included).
    parts = [optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
             optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=1e-8),
             optax.add_decayed_weights(cfg.weight_decay, decay_mask),
             optax.scale_by_learning_rate(lr_schedule(cfg))]
    has_memory = any(is_memory_value(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    if cfg.param_groups or (has_memory and cfg.memory_lr_mult != 1.0):
        parts.append(scale_by_tree(lr_multipliers(params, cfg.param_groups, cfg.memory_lr_mult)))
    return optax.chain(*parts)
