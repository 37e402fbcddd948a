"""``load_hf`` / ``save_hf``: Hugging Face MoE checkpoints <-> moejax Transformers."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import ModelConfig
from moejax.convert.checks import read_hf_config
from moejax.convert.families import EXPERT_LAYOUTS, Family, family_for_config
from moejax.convert.hf_config import HFConfig, UnsupportedConfigError, read_fp8_block
from moejax.convert.safetensors_io import TensorReader, write_sharded
from moejax.convert.weights import model_entries
from moejax.layer_stack import stack_layers, unstack_layers
from moejax.model import Transformer

log = logging.getLogger(__name__)


def _moe_prefix(reader: TensorReader, cfg: ModelConfig, family: Family) -> str:
    """Which block name holds the MoE weights (Mixtral: 'block_sparse_moe' or 'mlp')."""
    first = next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), None)
    if first is None:
        return family.moe_prefixes[0]
    for prefix in family.moe_prefixes:
        if f"model.layers.{first}.{prefix}.gate.weight" in reader:
            return prefix
    raise KeyError(f"no router weight model.layers.{first}.{{{','.join(family.moe_prefixes)}}}.gate.weight "
                   f"in the checkpoint at {reader.directory}")


def _ignorable(name: str, cfg: ModelConfig, reader: TensorReader) -> bool:
    """Tensors transformers itself skips (rotary caches, multi-token-prediction layers) and empty
    ones, which add nothing (DeepSeek's shared experts of width moe_intermediate_size * 0)."""
    if name.endswith("rotary_emb.inv_freq") or 0 in reader.shape(name):
        return True
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return cfg.mla is not None and match is not None and int(match.group(1)) >= cfg.n_layers


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def load_hf(path: str | Path, *, dtype: str = "float32", scan_layers: bool = False
            ) -> tuple[Transformer, ModelConfig]:
    """Load a Hugging Face MoE checkpoint directory (config.json + safetensors).

    Parameters are float32 (the model's master weights); ``dtype`` sets the
    compute dtype in the returned config. Tensors are read one at a time and
    placed straight into an abstract model, so no second copy of the model
    is ever built. Either expert layout (per-expert or fused 3-D) loads.
    ``scan_layers=True`` builds the model with scanned layer groups
    (parameters stacked per group; see moejax.layer_stack).
    """
    cfg, family, raw = read_hf_config(path)
    cfg = cfg.with_compute_dtype(dtype).replace(scan_layers=scan_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    pure = unstack_layers(nnx.to_pure_dict(state), cfg)   # HF names layers by index
    with TensorReader(path, fp8_block=read_fp8_block(HFConfig(raw))) as reader:
        _fill_variables(pure, reader, cfg, family, rope_interleaved=bool(raw.get("rope_interleave", True)))
    nnx.replace_by_pure_dict(state, stack_layers(pure, cfg))
    return nnx.merge(graphdef, state), cfg


def _fill_variables(pure: dict, reader: TensorReader, cfg: ModelConfig, family: Family, *,
                    rope_interleaved: bool) -> None:
    """Replace every abstract leaf of ``pure`` with its checkpoint tensor; leftovers on either side raise."""
    filled: set[tuple] = set()
    entries = model_entries(cfg, family, moe_prefix=_moe_prefix(reader, cfg, family), fused=False,
                            rope_interleaved=rope_interleaved)
    for entry in entries:
        try:
            arrays = entry.load(reader)
        except ValueError as err:  # e.g. a reshape that the tensor's size does not allow
            if reader.last_name is None or reader.last_name in str(err):
                raise
            raise ValueError(f"tensor {reader.last_name}: {err} (config.json implies another "
                             f"shape)") from None
        for sub, array in zip(entry.paths, arrays):
            want = _get(pure, sub).shape
            if array.shape != want:
                raise ValueError(f"{family.model_type}: tensor {reader.last_name} gives "
                                 f"{'.'.join(map(str, sub))} shape {array.shape}, config.json "
                                 f"implies {want}")
            # A copy XLA owns; waiting for it lets the host array go before the
            # next read (an async transfer would keep several alive at once).
            _set(pure, sub, jnp.array(array, jnp.float32, copy=True).block_until_ready())
            filled.add(sub)
    _check_tied_head(reader, cfg, pure["embed"])
    left = [n for n in reader.names() if n not in reader.read_names]
    unused = [n for n in left if not _ignorable(n, cfg, reader)]
    if unused:
        raise UnsupportedConfigError(f"{family.model_type}: checkpoint tensors not understood by "
                                     f"moejax.convert: {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    if len(left) > len(unused):
        log.info("skipped %d tensors transformers also ignores or that are empty", len(left) - len(unused))
    missing = [p for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]
               if tuple(k.key for k in p) not in filled]
    if missing:
        raise KeyError(f"moejax variables not found in the checkpoint: {missing[:8]}")


def _check_tied_head(reader: TensorReader, cfg: ModelConfig, embed_VD) -> None:
    """A tied config whose checkpoint still stores ``lm_head.weight``: the copy must be the embedding.

    transformers ties only an lm_head equal to the embedding; a different one it keeps as an untied
    head, so dropping it (as a tied moejax model would) changes every logit.
    """
    if not cfg.tie_embeddings or "lm_head.weight" not in reader:
        return
    head_VD = reader.get("lm_head.weight")
    if head_VD.shape != embed_VD.shape or not np.array_equal(head_VD, np.asarray(embed_VD)):
        raise UnsupportedConfigError(
            "config.json has tie_word_embeddings=true, but the checkpoint's lm_head.weight differs from "
            "model.embed_tokens.weight (transformers then keeps a separate head); set "
            "tie_word_embeddings to false in config.json if the checkpoint's head is the one meant")


def _check_model_fits(pure: dict, cfg: ModelConfig) -> None:
    """The model's variables are those of a float model of ``cfg`` (names and shapes), or a
    ValueError naming the first that differ (before anything is written)."""
    def shapes(tree):
        return {jax.tree_util.keystr(p): tuple(leaf.shape)
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    have = shapes(pure)
    want = shapes(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))))
    if have == want:
        return
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    reshaped = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    detail = "; ".join(f"{what} {keys[0]}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
                       for what, keys in (("missing", missing), ("unexpected", extra),
                                          ("shape differs:", reshaped)) if keys)
    raise ValueError(f"save_hf: the model's variables do not fit a float model of this config ({detail}); "
                     "pass the config the model was built with, and save before quantize_experts "
                     "(Hugging Face checkpoints hold float experts)")


def save_hf(model: Transformer, cfg: ModelConfig, path: str | Path, *, expert_layout: str = "per_expert",
            max_shard_bytes: int = 2 * 1024 ** 3) -> str:
    """Write ``model`` as a Hugging Face checkpoint directory; returns its model_type.

    ``expert_layout='per_expert'`` (default) writes ``experts.N.*`` tensors,
    which every transformers version reads and which transformers 5 itself
    writes; ``'fused'`` writes ``experts.gate_up_proj`` / ``experts.down_proj``.
    Configs no supported family can express raise UnsupportedConfigError; a
    ``capacity_factor`` (no HF equivalent: the export is dropless) warns.
    """
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
    family = family_for_config(cfg)
    hf_config = family.write(cfg)
    if cfg.moe is not None and cfg.moe.capacity_factor is not None:
        warnings.warn(f"save_hf: capacity_factor={cfg.moe.capacity_factor} has no Hugging Face "
                      f"equivalent; the {family.model_type} checkpoint routes every token (dropless) "
                      "and matches this model only on batches where no expert overflows", stacklevel=2)
    fused = expert_layout == "fused"
    prefix = "mlp" if fused else family.moe_prefixes[0]
    pure = nnx.to_pure_dict(nnx.state(model))
    _check_model_fits(pure, cfg)
    pure = unstack_layers(pure, cfg)

    def tensors():
        for entry in model_entries(cfg, family, moe_prefix=prefix, fused=fused):
            arrays = [np.asarray(_get(pure, p), np.float32) for p in entry.paths]
            yield from entry.dump(*arrays)

    path = Path(path)
    write_sharded(tensors(), path, max_shard_bytes=max_shard_bytes)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    return family.model_type
