"""Weight mapping between Hugging Face tensors and moejax variables, both ways.

One :class:`Entry` ties a few moejax variables (paths in
``nnx.to_pure_dict(nnx.state(model))``) to the HF tensors that hold them:
``load`` reads the HF tensors (one at a time) and returns the moejax arrays,
``dump`` turns moejax arrays back into ``(hf_name, array)`` pairs.

Layouts: HF linears are ``[out, in]``; moejax keeps ``[in, *out]`` with heads
split out (wq [D, H, K], wo [H, K, D]). Experts are stacked [E, D, F] /
[E, F, D] in moejax; HF checkpoints hold them per expert
(``experts.N.gate_proj`` ...) or fused (``experts.gate_up_proj`` [E, 2F, D],
``experts.down_proj`` [E, D, F]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from moejax.config import ModelConfig
from moejax.convert.families import Family
from moejax.convert.safetensors_io import TensorReader

Path = tuple
Arrays = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Entry:
    paths: tuple[Path, ...]
    load: Callable[[TensorReader], Arrays]
    dump: Callable[..., list[tuple[str, np.ndarray]]]


def checked(r: TensorReader, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read ``name`` and insist on the shape config.json implies."""
    array = r.get(name)
    if array.shape != tuple(shape):
        raise ValueError(f"tensor {name} has shape {array.shape}, config.json implies {tuple(shape)}")
    return array


def copy(path: Path, name: str) -> Entry:
    return Entry((path,), lambda r: (r.get(name),), lambda a: [(name, a)])


def linear(path: Path, name: str, shape: tuple[int, ...], n_in: int = 1) -> Entry:
    """HF ``[out, in]`` <-> moejax ``shape`` whose first ``n_in`` axes are the inputs."""
    hf_shape = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))

    def load(r):
        return (checked(r, name, hf_shape).T.reshape(shape),)

    def dump(a):
        return [(name, a.reshape(math.prod(shape[:n_in]), -1).T)]
    return Entry((path,), load, dump)


def bias(path: Path, name: str, shape: tuple[int, ...]) -> Entry:
    return Entry((path,), lambda r: (checked(r, name, (math.prod(shape),)).reshape(shape),),
                 lambda a: [(name, a.reshape(-1))])


def swiglu(path: Path, prefix: str, d_model: int, d_ff: int, names=("gate_proj", "up_proj", "down_proj")
           ) -> list[Entry]:
    gate, up, down = names
    return [linear(path + ("w_gate",), f"{prefix}.{gate}.weight", (d_model, d_ff)),
            linear(path + ("w_up",), f"{prefix}.{up}.weight", (d_model, d_ff)),
            linear(path + ("w_down",), f"{prefix}.{down}.weight", (d_ff, d_model))]


def empty_swiglu(prefix: str, d_model: int) -> Entry:
    """A SwiGLU of width 0 (adds nothing): written so transformers finds every tensor it builds;
    on load its empty tensors are skipped."""
    shapes = {"gate_proj": (0, d_model), "up_proj": (0, d_model), "down_proj": (d_model, 0)}
    return Entry((), lambda r: (), lambda: [(f"{prefix}.{name}.weight", np.zeros(shape, np.float32))
                                            for name, shape in shapes.items()])


def stacked_experts(path: Path, prefix: str, num_experts: int, d_model: int, d_ff: int,
                    names: tuple[str, str, str], fused: bool) -> Entry:
    """Routed experts: per-expert HF tensors or the fused 3-D pair <-> w_gate, w_up, w_down."""
    paths = (path + ("w_gate",), path + ("w_up",), path + ("w_down",))
    gate_up, down = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"

    def load(r):
        if gate_up in r:  # fused layout, found by name so either layout loads
            both_EXD = checked(r, gate_up, (num_experts, 2 * d_ff, d_model))
            w_gate_EDF = both_EXD[:, :d_ff].transpose(0, 2, 1).copy()
            w_up_EDF = both_EXD[:, d_ff:].transpose(0, 2, 1).copy()
            del both_EXD
            w_down_EFD = checked(r, down, (num_experts, d_model, d_ff)).transpose(0, 2, 1).copy()
            return w_gate_EDF, w_up_EDF, w_down_EFD
        stacks = (np.empty((num_experts, d_model, d_ff), np.float32),
                  np.empty((num_experts, d_model, d_ff), np.float32),
                  np.empty((num_experts, d_ff, d_model), np.float32))
        for stack, name in zip(stacks, names):
            for e in range(num_experts):  # one expert tensor in flight at a time
                stack[e] = checked(r, f"{prefix}.{e}.{name}.weight", stack.shape[:0:-1]).T
        return stacks

    def dump(w_gate_EDF, w_up_EDF, w_down_EFD):
        if fused:
            both = np.concatenate([w_gate_EDF.transpose(0, 2, 1), w_up_EDF.transpose(0, 2, 1)], axis=1)
            return [(gate_up, both), (down, w_down_EFD.transpose(0, 2, 1))]
        out = []
        for e in range(num_experts):
            for w, name in zip((w_gate_EDF, w_up_EDF, w_down_EFD), names):
                out.append((f"{prefix}.{e}.{name}.weight", w[e].T))
        return out
    return Entry(paths, load, dump)


def rope_half_order(rope_dim: int) -> np.ndarray:
    """Index map interleaved pairs (x0,x1),(x2,x3).. -> half-split [evens, odds].

    DeepSeek's checkpoints rotate interleaved pairs; moejax rotates the halves
    (rotate_half). Permuting the rotary columns of the q and k projections the
    same way makes the two identical: q.k is unchanged by a shared permutation.
    """
    return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])


def _permute_rope(w: np.ndarray, nope: int, order: np.ndarray) -> np.ndarray:
    out = w.copy()
    out[..., nope:] = w[..., nope:][..., order]
    return out


def mla_entries(cfg: ModelConfig, path: Path, prefix: str, interleaved: bool) -> list[Entry]:
    mla, d, h = cfg.mla, cfg.d_model, cfg.n_heads
    n, p, c, v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank, mla.v_head_dim
    order = rope_half_order(p) if interleaved else np.arange(p)
    inverse = np.argsort(order)

    def q_entry(sub: Path, name: str, rank: int) -> Entry:
        def load(r):
            return (_permute_rope(r.get(name).T.reshape(rank, h, n + p), n, order),)

        def dump(a):
            return [(name, _permute_rope(a, n, inverse).reshape(rank, -1).T)]
        return Entry((path + sub,), load, dump)

    kv_a, kv_b = f"{prefix}.kv_a_proj_with_mqa.weight", f"{prefix}.kv_b_proj.weight"

    def load_kv_a(r):
        w_DX = r.get(kv_a).T
        return w_DX[:, :c].copy(), w_DX[:, c:][:, order].copy()

    def dump_kv_a(wkv_a_DC, wk_rope_DP):
        return [(kv_a, np.concatenate([wkv_a_DC, wk_rope_DP[:, inverse]], axis=1).T)]

    def load_kv_b(r):
        w_CHX = r.get(kv_b).T.reshape(c, h, n + v)
        return w_CHX[..., :n].copy(), w_CHX[..., n:].copy()

    def dump_kv_b(wk_b_CHN, wv_b_CHV):
        return [(kv_b, np.concatenate([wk_b_CHN, wv_b_CHV], axis=-1).reshape(c, -1).T)]

    entries = [Entry((path + ("wkv_a",), path + ("wk_rope",)), load_kv_a, dump_kv_a),
               copy(path + ("kv_norm", "scale"), f"{prefix}.kv_a_layernorm.weight"),
               Entry((path + ("wk_b",), path + ("wv_b",)), load_kv_b, dump_kv_b),
               linear(path + ("wo",), f"{prefix}.o_proj.weight", (h, v, d), n_in=2)]
    if mla.q_lora_rank is None:
        entries.append(q_entry(("wq",), f"{prefix}.q_proj.weight", d))
    else:
        entries += [linear(path + ("wq_a",), f"{prefix}.q_a_proj.weight", (d, mla.q_lora_rank)),
                    copy(path + ("q_norm", "scale"), f"{prefix}.q_a_layernorm.weight"),
                    q_entry(("wq_b",), f"{prefix}.q_b_proj.weight", mla.q_lora_rank)]
    return entries


def gqa_entries(cfg: ModelConfig, path: Path, prefix: str) -> list[Entry]:
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    entries = [linear(path + ("wq",), f"{prefix}.q_proj.weight", (d, h, k)),
               linear(path + ("wk",), f"{prefix}.k_proj.weight", (d, g, k)),
               linear(path + ("wv",), f"{prefix}.v_proj.weight", (d, g, k)),
               linear(path + ("wo",), f"{prefix}.o_proj.weight", (h, k, d), n_in=2)]
    if cfg.attention_bias:
        entries += [bias(path + ("bq",), f"{prefix}.q_proj.bias", (h, k)),
                    bias(path + ("bk",), f"{prefix}.k_proj.bias", (g, k)),
                    bias(path + ("bv",), f"{prefix}.v_proj.bias", (g, k))]
    if cfg.qk_norm != "none":
        entries += [copy(path + ("q_norm", "scale"), f"{prefix}.q_norm.weight"),
                    copy(path + ("k_norm", "scale"), f"{prefix}.k_norm.weight")]
    return entries


def moe_entries(cfg: ModelConfig, family: Family, path: Path, prefix: str, fused: bool) -> list[Entry]:
    moe = cfg.moe
    entries = [linear(path + ("router", "kernel"), f"{prefix}.gate.weight", (cfg.d_model, moe.num_experts)),
               stacked_experts(path + ("experts",), f"{prefix}.experts", moe.num_experts, cfg.d_model,
                               moe.d_ff, family.expert_names, fused)]
    if moe.uses_router_bias:
        entries.append(copy(path + ("router", "bias"), f"{prefix}.gate.e_score_correction_bias"))
    if moe.num_shared_experts:
        entries += swiglu(path + ("shared",), f"{prefix}.{family.shared_prefix}", cfg.d_model,
                          moe.shared_hidden)
    elif family.empty_shared:
        entries.append(empty_swiglu(f"{prefix}.{family.shared_prefix}", cfg.d_model))
    if moe.shared_expert_gate:
        entries.append(linear(path + ("shared_gate",), f"{prefix}.{family.shared_gate}.weight",
                              (cfg.d_model, 1)))
    return entries


def model_entries(cfg: ModelConfig, family: Family, *, moe_prefix: str, fused: bool,
                  rope_interleaved: bool = True) -> list[Entry]:
    """Every Entry of the model, in checkpoint order."""
    entries = [copy(("embed",), "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        entries.append(copy(ours + ("attn_norm", "scale"), f"{hf}.input_layernorm.weight"))
        if cfg.mla is not None:
            entries += mla_entries(cfg, ours + ("attn",), f"{hf}.self_attn", rope_interleaved)
        else:
            entries += gqa_entries(cfg, ours + ("attn",), f"{hf}.self_attn")
        entries.append(copy(ours + ("ffn_norm", "scale"), f"{hf}.post_attention_layernorm.weight"))
        if cfg.is_moe_layer(i):
            entries += moe_entries(cfg, family, ours + ("ffn",), f"{hf}.{moe_prefix}", fused)
        else:
            entries += swiglu(ours + ("ffn",), f"{hf}.mlp", cfg.d_model, cfg.d_ff)
    entries.append(copy(("final_norm", "scale"), "model.norm.weight"))
    if not cfg.tie_embeddings:
        entries.append(linear(("lm_head",), "lm_head.weight", (cfg.d_model, cfg.vocab_size)))
    return entries
