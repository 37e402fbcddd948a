"""Model checkpoint I/O with orbax: a directory with ``config.json`` and the
model's variables (parameters and non-trained state such as router biases).

Layout of a model directory::

    DIR/config.json     ModelConfig (moejax.config.config_to_dict)
    DIR/model/          orbax checkpoint of nnx.state(model) as a pure dict
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
