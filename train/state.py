"""Building the train state on the mesh: fresh, from a model directory, or from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from moejax.config import ModelConfig
from moejax.model import Transformer
from train.checkpointing import Checkpoints, restore_model_dir
from train.start import StartPoint
from train.config import TrainConfig
from train.optim import is_memory_value, make_optimizer
from train.step import Shardings, abstract_like, make_shardings, split_model, variable_shardings


@dataclass
class TrainState:
    graphdef: Any
    tx: optax.GradientTransformation
    shardings: Shardings
    params: dict
    opt_state: Any
    nonparam: dict
    step: int
    meta: dict          # the restored checkpoint's meta ({} otherwise)

    def checkpoint_tree(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state, "nonparam": self.nonparam}

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params, self.nonparam)


def build_state(cfg: TrainConfig, start: StartPoint, mesh: Mesh, checkpoints: Checkpoints,
                batch_shape: tuple[int, int]) -> TrainState:
    """Shapes come from an abstract model (nothing is allocated twice); values from the
    seed, the model directory or the checkpoint, placed directly with their shardings."""
    model_cfg = start.model_cfg
    abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed)))
    graphdef, abstract_params, abstract_nonparam = split_model(abstract_model)
    tx = make_optimizer(cfg, abstract_params)
    sh = make_shardings(mesh, abstract_model, tx, abstract_params, batch_shape)

    if start.kind == "checkpoint":
        target = {"params": abstract_like(abstract_params, sh.params),
                  "opt_state": abstract_like(jax.eval_shape(tx.init, abstract_params), sh.opt_state),
                  "nonparam": abstract_like(abstract_nonparam, sh.nonparam)}
        step, tree, meta = checkpoints.restore_latest(target)
        return TrainState(graphdef, tx, sh, tree["params"], tree["opt_state"], tree["nonparam"],
                          step, meta)

    if start.kind == "model":
        params, nonparam = _from_model_dir(Path(cfg.out), abstract_model, mesh)
    else:  # one jitted init, each array created where its sharding puts it
        init = lambda: split_model(Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed)))[1:]  # noqa: E731
        params, nonparam = jax.jit(init, out_shardings=(sh.params, sh.nonparam))()
    params = jax.device_put(params, sh.params)
    nonparam = jax.device_put(nonparam, sh.nonparam)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
    return TrainState(graphdef, tx, sh, params, opt_state, nonparam, 0, {})


def _from_model_dir(out: Path, abstract_model: Transformer, mesh: Mesh) -> tuple[dict, dict]:
    state = nnx.state(abstract_model)
    target = abstract_like(nnx.to_pure_dict(state), variable_shardings(state, mesh))
    nnx.update(abstract_model, restore_model_dir(out, target))
    _, params, nonparam = split_model(abstract_model)
    return params, nonparam


def parameter_counts(model_cfg: ModelConfig, params: dict) -> tuple[int, int]:
    """(total, active per token): routed experts count top_k / num_experts of their size,
    memory value tables the rows a token reads (product keys: num_heads * top_k; Engram:
    one per n-gram order and hash head) out of their rows."""
    total = routed = idle_memory = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        total += leaf.size
        if any(getattr(k, "key", None) == "experts" for k in path):
            routed += leaf.size
        elif is_memory_value(path):
            rows = leaf.shape[-2]
            idle_memory += leaf.size * (1 - min(_rows_read(path, model_cfg), rows) / rows)
    share = model_cfg.moe.top_k / model_cfg.moe.num_experts if model_cfg.moe else 1.0
    return total, int(total - routed * (1 - share) - idle_memory)


def _rows_read(path, model_cfg: ModelConfig) -> int:
    """Rows of a value table one token reads: a product-key table sits in a ``values``
    module (MemoryValues; with share_values every 'pkm' layer reads the one table), an
    Engram table directly in its layer."""
    mem = model_cfg.memory
    if getattr(path[-2], "key", None) == "values":
        readers = sum(kind.startswith("pkm") for kind in model_cfg.ffn_kinds) if mem.share_values else 1
        return mem.num_heads * mem.top_k * readers
    return len(mem.ngram_orders) * mem.ngram_heads
