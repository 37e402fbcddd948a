"""The supported Hugging Face MoE families: config translation both ways and
the names their checkpoints give the MoE weights.

Each family reads a ``config.json`` (through :class:`HFConfig`, which rejects
every option it does not consume) into a :class:`ModelConfig`, and writes a
ModelConfig back, refusing configs the family cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from moejax.config import MLAConfig, MoEConfig, ModelConfig, _is_int, ffn_kinds_from_rule
from moejax.convert.hf_config import (HFConfig, UnsupportedConfigError, read_common, read_head_dim,
                                      read_rope, write_common)


EXPERT_LAYOUTS = ("per_expert", "fused")   # how save_hf writes routed experts


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    read: Callable[[HFConfig], ModelConfig]
    write: Callable[[ModelConfig], dict[str, Any]]
    moe_prefixes: tuple[str, ...] = ("mlp",)             # first is the one we write
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_prefix: str | None = None
    shared_gate: str | None = None
    # transformers builds these shared experts even when there are none (width
    # moe_intermediate_size * 0), so save_hf writes them empty
    empty_shared: bool = False


def _cannot(family: str, problems: list[str]) -> None:
    if problems:
        raise UnsupportedConfigError(
            f"this moejax config cannot be written as {family}: " + "; ".join(problems))


def _moe_problems(cfg: ModelConfig, *, router: str, shared: bool | None, gate: bool,
                  scaling: bool = False, groups: bool = False) -> list[str]:
    moe = cfg.moe
    if moe is None:
        return ["it has no MoE layers"]
    problems = []
    others = sorted(set(cfg.ffn_kinds) - {"dense", "moe"})
    if others:
        problems.append(f"ffn_kinds has {others} (only 'dense' and 'moe' exist in HF checkpoints)")
    if moe.router != router:
        problems.append(f"router={moe.router!r} (needs {router!r})")
    if shared is not None and bool(moe.num_shared_experts) != shared:   # None: with or without
        problems.append(f"num_shared_experts={moe.num_shared_experts} ({'needs' if shared else 'no'} "
                        "shared experts)")
    if moe.shared_expert_gate != gate:
        problems.append(f"shared_expert_gate={moe.shared_expert_gate}")
    if not scaling and moe.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={moe.routed_scaling_factor}")
    if not groups and (moe.n_group, moe.topk_group) != (1, 1):
        problems.append(f"n_group={moe.n_group}, topk_group={moe.topk_group}")
    if cfg.mla is not None:
        problems.append("it uses MLA attention")
    return problems


def _placement(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]


# ----------------------------------------------------------------- Mixtral
def _read_mixtral(hf: HFConfig) -> ModelConfig:
    common = read_common(hf, max_positions=4096 * 32, n_kv_heads=8, rope_theta=1e6, rms_norm_eps=1e-5)
    hf.expect("sliding_window", (None,), "moejax attention is full causal")
    hf.expect("router_jitter_noise", (0.0, 0), "training-time input jitter is not implemented")
    d_ff = hf.require("intermediate_size")
    moe = MoEConfig(d_model=common["d_model"], d_ff=d_ff, num_experts=hf.require("num_local_experts"),
                    top_k=hf.require("num_experts_per_tok"), norm_topk_prob=True,
                    aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), z_loss_coef=0.0)
    head_dim = read_head_dim(hf, common["d_model"], common["n_heads"])
    return ModelConfig(name="mixtral", d_ff=d_ff, moe=moe, head_dim=head_dim, **common)


def _write_mixtral(cfg: ModelConfig) -> dict[str, Any]:
    problems = _moe_problems(cfg, router="softmax", shared=False, gate=False)
    if cfg.moe is not None and not cfg.moe.norm_topk_prob:
        problems.append("norm_topk_prob=False (Mixtral always renormalises)")
    if _placement(cfg) != list(range(cfg.n_layers)):
        problems.append("not every layer is an MoE layer")
    if cfg.qk_norm != "none" or cfg.attention_bias:
        problems.append(f"qk_norm={cfg.qk_norm!r}, attention_bias={cfg.attention_bias}")
    _cannot("mixtral", problems)
    out = write_common(cfg, "mixtral", "MixtralForCausalLM")
    out.update(head_dim=cfg.resolved_head_dim, intermediate_size=cfg.moe.d_ff,
               num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
               router_aux_loss_coef=cfg.moe.aux_loss_coef, router_jitter_noise=0.0,
               sliding_window=None)
    return out


# --------------------------------------------------------- Qwen2-MoE / Qwen3-MoE
def _qwen_moe_layers(hf: HFConfig, n_layers: int) -> tuple[int, ...]:
    step = hf.get("decoder_sparse_step", 1)
    mlp_only = hf.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(_is_int(i) for i in mlp_only):
        raise UnsupportedConfigError(f"{hf.model_type} config.json: mlp_only_layers={mlp_only!r} "
                                     "must be a list of layer indices")
    if not _is_int(step) or step < 1:
        raise UnsupportedConfigError(f"{hf.model_type} config.json: decoder_sparse_step={step!r} "
                                     "must be a positive int")
    return tuple(i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0)


def _read_qwen(hf: HFConfig, *, qwen3: bool) -> ModelConfig:
    common = read_common(hf, max_positions=32768, n_kv_heads=4 if qwen3 else 16)
    if hf.flag("use_sliding_window", False):
        raise UnsupportedConfigError(f"{hf.model_type} config.json: use_sliding_window=True is not "
                                     "supported (moejax attention is full causal)")
    hf.used.update({"sliding_window", "max_window_layers", "layer_types"})
    layer_types = set(hf.data.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UnsupportedConfigError(f"{hf.model_type} config.json: layer_types {sorted(layer_types)} "
                                     "(only 'full_attention' is supported)")
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts, 4.x as num_experts.
    counts = {hf.data[k] for k in ("num_experts", "num_local_experts") if hf.data.get(k) is not None}
    hf.used.update({"num_experts", "num_local_experts"})
    if len(counts) != 1:
        raise UnsupportedConfigError(f"{hf.model_type} config.json: needs one expert count in "
                                     f"num_experts / num_local_experts, got {sorted(counts)}")
    num_experts = counts.pop()
    layers = _qwen_moe_layers(hf, common["n_layers"])
    if qwen3:
        hf.expect("attention_bias", (False,), "Qwen3-MoE attention bias (incl. o_proj) is not implemented")
        shared = {}
    else:
        shared_width = hf.require("shared_expert_intermediate_size")
        shared = dict(num_shared_experts=1, shared_d_ff=shared_width, shared_expert_gate=True)
    moe = MoEConfig(d_model=common["d_model"], d_ff=hf.require("moe_intermediate_size"),
                    num_experts=num_experts, top_k=hf.require("num_experts_per_tok"),
                    norm_topk_prob=hf.flag("norm_topk_prob", False),
                    aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), z_loss_coef=0.0,
                    **shared)
    return ModelConfig(
        name=hf.model_type, d_ff=hf.require("intermediate_size"), moe=moe,
        ffn_kinds=ffn_kinds_from_rule(common["n_layers"], moe, moe_layers=layers),
        head_dim=read_head_dim(hf, common["d_model"], common["n_heads"]),
        qk_norm="head" if qwen3 else "none",
        attention_bias=False if qwen3 else hf.flag("qkv_bias", True), **common)


def _write_qwen(cfg: ModelConfig, *, qwen3: bool) -> dict[str, Any]:
    family = "qwen3_moe" if qwen3 else "qwen2_moe"
    problems = _moe_problems(cfg, router="softmax", shared=not qwen3, gate=not qwen3)
    if qwen3 and (cfg.qk_norm != "head" or cfg.attention_bias):
        problems.append(f"qk_norm={cfg.qk_norm!r} (needs 'head'), attention_bias={cfg.attention_bias}")
    if not qwen3 and cfg.qk_norm != "none":
        problems.append(f"qk_norm={cfg.qk_norm!r}")
    _cannot(family, problems)
    moe = cfg.moe
    out = write_common(cfg, family, "Qwen3MoeForCausalLM" if qwen3 else "Qwen2MoeForCausalLM")
    moe_layers = _placement(cfg)
    out.update(head_dim=cfg.resolved_head_dim, intermediate_size=cfg.d_ff,
               moe_intermediate_size=moe.d_ff, num_experts=moe.num_experts,
               num_experts_per_tok=moe.top_k, norm_topk_prob=moe.norm_topk_prob,
               decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe_layers],
               router_aux_loss_coef=moe.aux_loss_coef, use_sliding_window=False,
               sliding_window=None)
    if qwen3:
        out["attention_bias"] = False
    else:
        # transformers 4.x always gives Qwen2-MoE q/k/v biases; qkv_bias=False needs 5.x.
        out.update(shared_expert_intermediate_size=moe.shared_hidden, qkv_bias=cfg.attention_bias)
    return out


# ------------------------------------------------------------------- OLMoE
def _read_olmoe(hf: HFConfig) -> ModelConfig:
    common = read_common(hf, max_positions=4096, rms_norm_eps=1e-5)
    hf.expect("clip_qkv", (None,), "q/k/v clipping is not implemented")
    hf.expect("attention_bias", (False,), "OLMoE attention bias is not implemented")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * common["n_heads"] != common["d_model"]:
        raise UnsupportedConfigError(f"olmoe config.json: head_dim={head_dim} differs from "
                                     "hidden_size / num_attention_heads (its q_norm spans hidden_size)")
    d_ff = hf.require("intermediate_size")
    moe = MoEConfig(d_model=common["d_model"], d_ff=d_ff, num_experts=hf.require("num_experts"),
                    top_k=hf.require("num_experts_per_tok"),
                    norm_topk_prob=hf.flag("norm_topk_prob", False),
                    aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)), z_loss_coef=0.0)
    return ModelConfig(name="olmoe", d_ff=d_ff, moe=moe, qk_norm="proj", **common)


def _write_olmoe(cfg: ModelConfig) -> dict[str, Any]:
    problems = _moe_problems(cfg, router="softmax", shared=False, gate=False)
    if cfg.qk_norm != "proj" or cfg.attention_bias:
        problems.append(f"qk_norm={cfg.qk_norm!r} (needs 'proj'), attention_bias={cfg.attention_bias}")
    if cfg.resolved_head_dim * cfg.n_heads != cfg.d_model:
        problems.append("head_dim * n_heads != d_model")
    if _placement(cfg) != list(range(cfg.n_layers)):
        problems.append("not every layer is an MoE layer")
    _cannot("olmoe", problems)
    out = write_common(cfg, "olmoe", "OlmoeForCausalLM")
    out.update(intermediate_size=cfg.moe.d_ff, num_experts=cfg.moe.num_experts,
               num_experts_per_tok=cfg.moe.top_k, norm_topk_prob=cfg.moe.norm_topk_prob,
               router_aux_loss_coef=cfg.moe.aux_loss_coef, clip_qkv=None, attention_bias=False)
    return out


# ------------------------------------------------------------- DeepSeek-V3
def _read_deepseek_v3(hf: HFConfig) -> ModelConfig:
    common = read_common(hf, max_positions=4096)   # kv heads: MLA has one per head
    hf.expect("attention_bias", (False,), "MLA projection biases are not implemented")
    hf.expect("scoring_func", ("sigmoid",), "DeepSeek-V3 routing scores are sigmoids")
    hf.expect("topk_method", ("noaux_tc",), "DeepSeek-V3 selects with the correction bias")
    hf.expect("moe_layer_freq", (1,), "transformers' DeepseekV3 places an MoE in every layer "
                                      "after first_k_dense_replace")
    hf.get("rope_interleave", True)          # handled by the weight mapping
    hf.used.update({"head_dim", "qk_head_dim", "num_nextn_predict_layers", "num_mtp_layers"})
    if common["n_kv_heads"] != common["n_heads"]:
        raise UnsupportedConfigError(
            f"deepseek_v3 config.json: num_key_value_heads={common['n_kv_heads']} differs from "
            f"num_attention_heads={common['n_heads']} (MLA expands its latent to every head)")
    _, _, softmax_mscale = read_rope(hf, common["max_seq_len"])  # YaRN's mscale_all_dim also scales MLA's softmax
    # Keys config.json leaves out take transformers' DeepseekV3Config defaults (2.5, 8, 4, ...),
    # not neutral values: a missing routed_scaling_factor scales the routed experts by 2.5 there.
    mla = MLAConfig(kv_lora_rank=hf.require("kv_lora_rank"),
                    q_lora_rank=hf.written("q_lora_rank", 1536),   # null: a full query projection
                    qk_nope_head_dim=hf.require("qk_nope_head_dim"),
                    qk_rope_head_dim=hf.require("qk_rope_head_dim"), v_head_dim=hf.require("v_head_dim"),
                    softmax_mscale=softmax_mscale)
    expert_width = hf.require("moe_intermediate_size")
    n_shared = hf.written("n_shared_experts", 1) or 0   # null: none (DeepSeek's own modeling code)
    moe = MoEConfig(d_model=common["d_model"], d_ff=expert_width,
                    num_experts=hf.require("n_routed_experts"), top_k=hf.require("num_experts_per_tok"),
                    num_shared_experts=n_shared, shared_d_ff=expert_width * n_shared or None,
                    router="sigmoid", norm_topk_prob=hf.flag("norm_topk_prob", True),
                    routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
                    n_group=hf.get("n_group", 8), topk_group=hf.get("topk_group", 4),
                    aux_loss_type="sequence", aux_loss_coef=float(hf.data.get("aux_loss_alpha") or 0.0),
                    z_loss_coef=0.0)
    first_dense = hf.get("first_k_dense_replace", 3)
    if not _is_int(first_dense) or first_dense < 0:
        raise UnsupportedConfigError(f"deepseek_v3 config.json: first_k_dense_replace={first_dense!r} "
                                     "must be an int >= 0")
    # transformers makes layer i an MoE layer when i >= first_k_dense_replace, so a value past
    # num_hidden_layers (the default 3 in a 2-layer test model) means every layer is dense.
    first_dense = min(first_dense, common["n_layers"])
    return ModelConfig(name="deepseek_v3", d_ff=hf.require("intermediate_size"), moe=moe, mla=mla,
                       ffn_kinds=ffn_kinds_from_rule(common["n_layers"], moe, first_k_dense=first_dense),
                       **common)


def _write_deepseek_v3(cfg: ModelConfig) -> dict[str, Any]:
    problems = _moe_problems(cfg, router="sigmoid", shared=None, gate=False, scaling=True, groups=True)
    problems = [p for p in problems if p != "it uses MLA attention"]
    moe, mla = cfg.moe, cfg.mla
    if mla is None:
        problems.append("it uses GQA attention (DeepSeek-V3 needs MLA)")
    else:
        if mla.latent_norm_eps != 1e-6:
            problems.append(f"mla.latent_norm_eps={mla.latent_norm_eps} (transformers uses 1e-6)")
        if mla.softmax_mscale != 1.0 and (cfg.rope_yarn is None or cfg.rope_yarn.factor <= 1):
            problems.append("mla.softmax_mscale != 1 needs YaRN with factor > 1")
    if moe is not None:
        if moe.num_shared_experts and moe.shared_hidden % moe.d_ff:
            problems.append(f"shared width {moe.shared_hidden} is not a multiple of d_ff={moe.d_ff}")
        if moe.num_experts // moe.n_group < 2:
            problems.append("fewer than 2 experts per group")
    first_moe = next(iter(_placement(cfg)), cfg.n_layers)
    if _placement(cfg) != list(range(first_moe, cfg.n_layers)):
        problems.append("MoE layers are not one block after the first dense layers")
    _cannot("deepseek_v3", problems)
    out = write_common(cfg, "deepseek_v3", "DeepseekV3ForCausalLM")
    out.update(intermediate_size=cfg.d_ff, moe_intermediate_size=moe.d_ff,
               n_routed_experts=moe.num_experts, n_shared_experts=moe.shared_hidden // moe.d_ff,
               num_experts_per_tok=moe.top_k, norm_topk_prob=moe.norm_topk_prob,
               routed_scaling_factor=moe.routed_scaling_factor, n_group=moe.n_group,
               topk_group=moe.topk_group, first_k_dense_replace=first_moe,
               kv_lora_rank=mla.kv_lora_rank, q_lora_rank=mla.q_lora_rank,
               qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
               v_head_dim=mla.v_head_dim, rope_interleave=True, attention_bias=False,
               scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0,
               aux_loss_alpha=moe.aux_loss_coef, seq_aux=moe.aux_loss_type == "sequence")
    return out


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", "MixtralForCausalLM", _read_mixtral, _write_mixtral,
           moe_prefixes=("block_sparse_moe", "mlp"), expert_names=("w1", "w3", "w2")),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", lambda hf: _read_qwen(hf, qwen3=False),
           lambda cfg: _write_qwen(cfg, qwen3=False), shared_prefix="shared_expert",
           shared_gate="shared_expert_gate"),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", lambda hf: _read_qwen(hf, qwen3=True),
           lambda cfg: _write_qwen(cfg, qwen3=True)),
    Family("olmoe", "OlmoeForCausalLM", _read_olmoe, _write_olmoe),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", _read_deepseek_v3, _write_deepseek_v3,
           shared_prefix="shared_experts", empty_shared=True),
)}


def family_for_hf(hf_config: dict[str, Any]) -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        archs = hf_config.get("architectures")
        raise UnsupportedConfigError(
            f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"moejax.convert supports: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def family_for_config(cfg: ModelConfig) -> Family:
    """The family that expresses ``cfg`` exactly (the one it was loaded from, when it still fits)."""
    if cfg.name in FAMILIES:
        candidates = [cfg.name] + [t for t in FAMILIES if t != cfg.name]
    else:
        candidates = list(FAMILIES)
    reasons = []
    for model_type in candidates:
        try:
            FAMILIES[model_type].write(cfg)
            return FAMILIES[model_type]
        except UnsupportedConfigError as err:
            reasons.append(str(err))
    raise UnsupportedConfigError("no Hugging Face family expresses this config: " + " | ".join(reasons))
