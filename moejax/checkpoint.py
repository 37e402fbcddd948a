"""Checkpoint I/O with orbax.

Model directory: ``config.json`` and the model's variables (parameters and
non-trained state such as router biases)::

    DIR/config.json     ModelConfig (moejax.config.config_to_dict)
    DIR/model/          orbax checkpoint of nnx.state(model) as a pure dict

Train states: an orbax ``CheckpointManager`` over ``DIR/<step>/`` with two
items, ``state`` (any pytree of arrays: parameters, optimizer state, ...) and
``meta`` (JSON). Saves are asynchronous and atomic: orbax writes into a
temporary directory and renames it when complete, so a crash mid-save leaves
the previous step as the latest.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from moejax.config import ModelConfig, config_from_dict, config_to_dict
from moejax.model import Transformer


def save_config(directory: str | Path, cfg: ModelConfig) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2))
    tmp.replace(directory / "config.json")  # atomic: never a half-written config


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    return config_from_dict(json.loads(path.read_text()))


def save_model(directory: str | Path, model: Transformer, cfg: ModelConfig) -> None:
    """Write config.json and the model variables (orbax writes atomically)."""
    directory = Path(directory).absolute()
    save_config(directory, cfg)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "model", state, force=True)


def load_model(directory: str | Path, *, dtype: str | None = None) -> tuple[Transformer, ModelConfig]:
    """Build the model from config.json and restore its variables."""
    directory = Path(directory).absolute()
    cfg = load_config(directory)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    # An abstract model: building a real one first would run (and compile) every
    # initializer only to overwrite the result.
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(abstract_state))
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(directory / "model", abstract)
    nnx.replace_by_pure_dict(abstract_state, state)
    return nnx.merge(graphdef, abstract_state), cfg


def train_state_manager(directory: str | Path, *, keep: int, async_save: bool = True
                        ) -> ocp.CheckpointManager:
    """A manager of train-state checkpoints under ``directory`` that keeps the last ``keep``."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def _path_key(path) -> str:
    # dict keys, sequence indices and named-tuple fields all become plain names, the
    # way orbax stores them
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def check_tree_shapes(stored, abstract) -> None:
    """Raise ValueError naming the first leaf whose path or shape differs between a
    checkpoint's metadata tree and the expected abstract tree (before any array is read)."""
    stored = getattr(stored, "tree", stored)
    have = {_path_key(p): tuple(getattr(leaf, "shape", ()))
            for p, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {_path_key(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    problems = [f"{k}: stored {have[k]} vs expected {want[k]}"
                for k in want if k in have and have[k] != want[k]]
    problems += [f"{k}: missing from the checkpoint" for k in want if k not in have]
    problems += [f"{k}: not in the model" for k in have if k not in want]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0]}{more}")


def save_train_state(manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Start saving ``state`` (pytree) and ``meta`` (JSON) as ``step``; returns once the
    arrays are copied, so the caller may donate them to the next step."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Restore ``step`` into the structure, shapes, dtypes and shardings of
    ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct``) -> (state, meta).
    A checkpoint of another shape raises ValueError before anything is read."""
    check_tree_shapes(manager.item_metadata(step)["state"], abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def restore_model_variables(directory: str | Path, abstract_state):
    """The variables of a model directory (``DIR/model``) restored into ``abstract_state``
    (a pure dict of ``jax.ShapeDtypeStruct``, shardings allowed): no model is built."""
    path = Path(directory).absolute() / "model"
    with ocp.StandardCheckpointer() as ckptr:
        check_tree_shapes(ckptr.metadata(path).item_metadata, abstract_state)
        return ckptr.restore(path, abstract_state)
