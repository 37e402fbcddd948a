"""Plugging the offloaded model into ``serve.Engine``: loading, the per-step runner, telemetry.

``serve.Engine.load(DIR, offload=OffloadConfig(...))`` comes here: the
non-expert weights load onto the device as usual, the routed experts stay in
the store (host memory or the checkpoint's experts file) and the model keeps
only their abstract shapes. The engine's scheduler, sampling and HTTP server
are unchanged; only its step runs layer by layer (:class:`OffloadRunner`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.model import Transformer
from serve import tensorfile
from serve.export import ExportError, expert_split, key_of, read_config, read_manifest
from serve.offload.config import OffloadConfig, OffloadConfigError
from serve.offload.offloaded import OffloadedModel, moe_of
from serve.offload.slots import LayerStats
from serve.offload.store import DiskStore, HostStore
from serve.runner import _last_logits
from serve.sampling import sample
from serve.tokenizer import load_tokenizer


@jax.jit
def _sample_last(logits_BSV, lengths_B, temperature_B, top_p_B, top_k_B, seed_B2, index_B):
    return sample(_last_logits(logits_BSV, lengths_B - 1), temperature_B, top_p_B, top_k_B,
                  seed_B2, index_B)


class OffloadRunner:
    """Engine runner over an :class:`OffloadedModel`: per-layer attention caches, Python step."""

    name = "offload"

    def __init__(self, offloaded: OffloadedModel, num_slots: int, max_len: int, max_chunk: int):
        self.offloaded = offloaded
        self.num_slots, self.max_len, self.max_chunk = num_slots, max_len, max_chunk

    def init_state(self, model) -> dict:
        return {"caches": self.offloaded.init_caches(self.num_slots, self.max_len),
                "lengths_B": np.zeros(self.num_slots, np.int32)}

    def warmup(self, widths) -> None:
        """``Engine.warmup``: compile the per-layer pieces, copies and slot computes of steps
        of these widths by running one per width on a scratch state (every row busy), then
        forget its copies and figures."""
        step, batch = self.make_step(None), self.num_slots
        for width in widths:
            step(None, self.init_state(None), np.zeros((batch, width), np.int32),
                 np.full(batch, width, np.int32), np.ones(batch, bool), np.zeros(batch, np.float32),
                 np.ones(batch, np.float32), np.zeros(batch, np.int32), np.zeros((batch, 2), np.uint32),
                 np.zeros(batch, np.int32))
        self.offloaded.reset()

    def make_step(self, graphdef):
        """The engine's step function (same signature as ``serve.runner.compile_step``'s)."""
        del graphdef  # the offloaded model holds its own per-layer pieces

        def step(model_state, state, tokens_BS, lengths_B, reset_B, temperature_B, top_p_B, top_k_B,
                 seed_B2, index_B):
            lengths_B = np.asarray(lengths_B, np.int32)
            start_B = np.where(np.asarray(reset_B), 0, state["lengths_B"]).astype(np.int32)
            width = np.asarray(tokens_BS).shape[1]
            positions_BS = start_B[:, None] + np.arange(width, dtype=np.int32)[None, :]
            valid_BS = np.arange(width)[None, :] < lengths_B[:, None]
            logits_BSV, caches = self.offloaded.forward(tokens_BS, positions_BS, valid_BS,
                                                        caches=state["caches"])
            next_B = _sample_last(logits_BSV, lengths_B, temperature_B, top_p_B, top_k_B, seed_B2,
                                  index_B)
            return next_B, {"caches": caches, "lengths_B": start_B + lengths_B}

        return step


def telemetry(offloaded: OffloadedModel) -> dict[str, float]:
    """Store figures, total and per MoE layer, flat (for --stats and /metrics)."""
    stats = offloaded.layer_stats()
    store = offloaded.store
    tokens = max(stats[0].tokens, 1)
    total = LayerStats()
    for s in stats:
        total = total + s

    def figures(s: LayerStats, prefix: str) -> dict[str, float]:
        return {f"{prefix}hit_rate": round(s.hit_rate, 4),
                f"{prefix}prefetch_precision": round(s.prefetch_precision, 4),
                f"{prefix}prefetch_recall": round(s.prefetch_recall, 4),
                f"{prefix}stalls": s.demand_loads, f"{prefix}prefetch_wasted": s.prefetch_wasted,
                f"{prefix}extra_waves": s.extra_waves}

    out = figures(total, "")
    out.update(tokens=stats[0].tokens, slots=sum(t.num_slots for t in offloaded.tables),
               bytes_host_to_device_per_token=round(store.bytes_to_device / tokens, 1),
               bytes_disk_to_host_per_token=round(store.bytes_from_disk / tokens, 1),
               device_slot_bytes=sum(p.nbytes for p in offloaded.pools))
    for layer, s in enumerate(stats):
        out.update(figures(s, f"layer{offloaded.moe_index[layer]}_"))
    return out


def _model_without_experts(cfg, rest: tensorfile.MappedFile, directory: Path) -> Transformer:
    """The model with every non-expert weight loaded; routed experts stay abstract (shapes only)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    names, leaves = set(rest.names()), []
    for path, leaf in flat:
        key = key_of(path)
        if expert_split(key) is not None:
            leaves.append(leaf)
            continue
        if key not in names:
            raise ExportError(f"{directory}: variable {key} is missing from the checkpoint")
        array = rest.get(key)
        if tuple(array.shape) != tuple(leaf.shape):
            raise ExportError(f"{directory}: {key} has shape {tuple(array.shape)}, the config implies "
                              f"{tuple(leaf.shape)}")
        leaves.append(jnp.asarray(array))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
    return nnx.merge(graphdef, state)


def build_store(directory: Path, manifest: dict, moe_index: list[int], offload: OffloadConfig):
    """The expert store the config asks for, over the checkpoint's experts file."""
    source = Path(offload.path) if offload.path is not None else directory
    experts_file = source / manifest["files"]["experts"]
    if not experts_file.is_file():
        field = "path" if offload.path is not None else "store"
        raise OffloadConfigError(f"OffloadConfig.{field}: {source} does not hold the checkpoint's "
                                 f"experts file {manifest['files']['experts']}")
    names = []
    for i in moe_index:      # 'layers.i.ffn.experts', or 'layers.i.ffn.ffn.experts' beside a memory
        prefixes = [p for p in manifest["experts"] if p.startswith(f"layers.{i}.")]
        if len(prefixes) != 1:
            raise ExportError(f"{directory}: manifest lists {len(prefixes)} expert sets for MoE "
                              f"layer {i}, expected 1")
        prefix = prefixes[0]
        entry = manifest["experts"][prefix]
        names.append([{n: f"{prefix}.{e}.{n}" for n in entry["tensors"]}
                      for e in range(entry["num_experts"])])
    disk = DiskStore(experts_file, names)
    if offload.store == "disk":
        return disk
    stacked = [{n: np.stack([disk.host_arrays(layer, e)[n] for e in range(disk.num_experts)])
                for n in disk.names} for layer in range(disk.num_layers)]
    return HostStore(stacked)


def load_offloaded(engine_cls, directory: str | Path, offload: OffloadConfig, **engine_kwargs):
    """``Engine.load(directory, offload=...)``: an engine whose routed experts live in a store."""
    if not isinstance(offload, OffloadConfig):
        raise TypeError(f"offload must be a serve.OffloadConfig, got {type(offload).__name__}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    cfg = read_config(directory, manifest)
    model = _model_without_experts(cfg, tensorfile.MappedFile(directory / manifest["files"]["model"]),
                                   directory)
    moe_index = [i for i, b in enumerate(model.layers) if moe_of(b.ffn) is not None]
    if not moe_index:
        raise OffloadConfigError(f"OffloadConfig: {directory} has no MoE layers to offload")
    slots_L, frequency_LE = offload.resolve(len(moe_index), cfg.moe.num_experts)
    store = build_store(directory, manifest, moe_index, offload)
    offloaded = OffloadedModel(model, store, slots_L, policy=offload.policy, prefetch=offload.prefetch,
                               frequency_LE=frequency_LE, lfru_decay=offload.lfru_decay)
    runner = partial(OffloadRunner, offloaded)
    engine = engine_cls(model, load_tokenizer(manifest["tokenizer"], directory), runner=runner,
                        **engine_kwargs)
    engine.source = str(directory)
    engine.offloaded = offloaded
    engine.extra_stats["expert_store"] = lambda: telemetry(offloaded)
    return engine
