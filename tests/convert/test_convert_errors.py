"""Unsupported architectures, options and tensors fail loudly, naming what is wrong."""

import numpy as np
import pytest

from moejax import quantize_experts
from moejax.config import ConfigError, MLAConfig, MoEConfig, ModelConfig
from moejax.convert import SUPPORTED_MODEL_TYPES, UnsupportedConfigError, load_hf, save_hf
from test_convert_io import family_configs, random_model, rewrite_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> directory written by save_hf (valid, loadable)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for family, cfg in family_configs().items():
        save_hf(random_model(cfg), cfg, root / family)
        out[family] = root / family
    return out


def with_config(src, dst, **changes):
    """A copy of checkpoint ``src`` whose config.json has ``changes`` (None deletes a key)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    rewrite_config(src / "config.json", dst / "config.json", changes)
    return dst


@pytest.mark.parametrize("model_type", ["llama", "gpt_oss", "deepseek_v2", "jamba"])
def test_unsupported_architecture_is_named(saved, tmp_path, model_type):
    path = with_config(saved["mixtral"], tmp_path / "x", model_type=model_type)
    with pytest.raises(UnsupportedConfigError, match=model_type) as err:
        load_hf(path)
    assert all(t in str(err.value) for t in SUPPORTED_MODEL_TYPES)


REJECTED = [
    ("mixtral", {"sliding_window": 4096}, "sliding_window"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("mixtral", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "original_max_position_embeddings"),
    ("mixtral", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "llama3"),
    ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                       "original_max_position_embeddings": 8, "low_freq_factor": 1.0}},
     "low_freq_factor"),
    ("mixtral", {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ("mixtral", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                     "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("mixtral", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ("mixtral", {"quantization_config": {"quant_method": "awq", "bits": 4}}, "awq"),
    ("mixtral", {"some_new_switch": True}, "some_new_switch"),
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
    ("qwen3_moe", {"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("olmoe", {"attention_dropout": 0.1}, "attention_dropout"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method"),
    ("deepseek_v3", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias"),
    ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}},
     "dynamic"),
    # wrongly typed values: bool("false") was True (routing silently renormalised), the others
    # crashed with a message naming no key
    ("deepseek_v3", {"norm_topk_prob": "false"}, "norm_topk_prob='false' must be true or false"),
    ("qwen2_moe", {"qkv_bias": "false"}, "qkv_bias='false' must be true or false"),
    ("qwen2_moe", {"mlp_only_layers": 3}, "mlp_only_layers=3 must be a list"),
    ("mixtral", {"rope_scaling": ["yarn"]}, "rope_scaling=.* must be an object"),
    ("mixtral", {"quantization_config": "fp8"}, "quantization_config='fp8' must be an object"),
]


@pytest.mark.parametrize("family,changes,named", REJECTED, ids=[r[2] for r in REJECTED])
def test_unsupported_option_is_named(saved, tmp_path, family, changes, named):
    path = with_config(saved[family], tmp_path / "x", **changes)
    with pytest.raises(UnsupportedConfigError, match=named):
        load_hf(path)


@pytest.mark.parametrize("changes,field", [
    ({"num_key_value_heads": 0}, "n_kv_heads"),          # was read as 'absent': n_heads
    ({"max_position_embeddings": 0}, "max_seq_len"),     # was read as 'absent': 2048
    ({"tie_word_embeddings": "false"}, "tie_embeddings"),  # a truthy string was True
    ({"head_dim": 6.5}, "head_dim"),                      # was truncated to 6
])
def test_bad_values_are_named_not_defaulted(saved, tmp_path, changes, field):
    path = with_config(saved["mixtral"], tmp_path / "x", **changes)
    with pytest.raises(UnsupportedConfigError, match=rf"config.json: ModelConfig\.{field}\b"):
        load_hf(path)


def test_inert_metadata_is_accepted(saved, tmp_path):
    path = with_config(saved["olmoe"], tmp_path / "x", bos_token_id=1, eos_token_id=2,
                       initializer_range=0.02, use_cache=False, auto_map={"AutoConfig": "x.Y"})
    load_hf(path)


def test_unknown_tensor_is_an_error(saved, tmp_path):
    from safetensors.numpy import load_file, save_file
    dst = with_config(saved["mixtral"], tmp_path / "x")
    (dst / "model.safetensors").unlink()
    tensors = load_file(str(saved["mixtral"] / "model.safetensors"))
    tensors["model.layers.0.block_sparse_moe.extra_scale"] = np.ones(3, np.float32)
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(UnsupportedConfigError, match="extra_scale"):
        load_hf(dst)


def test_missing_tensor_and_wrong_shape_are_errors(saved, tmp_path):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(saved["qwen3_moe"] / "model.safetensors"))
    missing = dict(tensors)
    missing.pop("model.layers.2.mlp.experts.3.up_proj.weight")
    (tmp_path / "a").mkdir()
    save_file(missing, str(tmp_path / "a" / "model.safetensors"))
    (tmp_path / "a" / "config.json").write_text((saved["qwen3_moe"] / "config.json").read_text())
    with pytest.raises(KeyError, match="experts.3.up_proj"):
        load_hf(tmp_path / "a")

    path = with_config(saved["qwen3_moe"], tmp_path / "b", moe_intermediate_size=20)
    with pytest.raises(ValueError, match="experts.0.gate_proj.weight has shape"):
        load_hf(path)


def test_save_hf_refuses_configs_no_family_expresses(tmp_path):
    # Sigmoid routing without MLA: DeepSeek-V3 in transformers always has MLA.
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=16,
                      moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, router="sigmoid",
                                    num_shared_experts=1))
    with pytest.raises(UnsupportedConfigError, match="deepseek_v3.*GQA"):
        save_hf(random_model(cfg), cfg, tmp_path)
    with pytest.raises(ValueError, match="expert_layout"):
        save_hf(random_model(cfg), cfg, tmp_path, expert_layout="columns")


def test_save_hf_refuses_a_model_that_does_not_fit_its_config(tmp_path):
    """Int8 experts, or a config other than the model's: a ValueError naming a variable,
    before anything is written (it was a bare KeyError from inside the writer)."""
    cfg = family_configs()["mixtral"]
    model = random_model(cfg)
    with pytest.raises(ValueError, match=r"missing \['layers'\]\[2\]"):
        save_hf(model, cfg.replace(n_layers=3), tmp_path / "a")
    with pytest.raises(ValueError, match=r"unexpected \['layers'\]\[0\]\['ffn'\]\['experts'\]\['q_"):
        save_hf(quantize_experts(model), cfg, tmp_path / "b")
    assert not any(tmp_path.iterdir())


def test_model_config_validates_new_fields():
    base = dict(vocab_size=32, d_model=16, n_layers=3, n_heads=2, n_kv_heads=2, d_ff=16)
    moe = MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2)
    assert [ModelConfig(**base, moe=moe, ffn_kinds=("moe", "dense", "moe")).is_moe_layer(i)
            for i in range(3)] == [True, False, True]
    for bad in [("moe",), ("moe", "dense", "pkm?"), ["moe", "moe", "moe"]]:
        with pytest.raises(ConfigError, match="ffn_kinds"):
            ModelConfig(**base, moe=moe, ffn_kinds=bad)
    with pytest.raises(ConfigError, match="ffn_kinds.*needs moe"):
        ModelConfig(**base, ffn_kinds=("moe", "dense", "dense"))
    mla = MLAConfig(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(**{**base, "n_kv_heads": 1}, mla=mla)
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        MLAConfig(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=3, v_head_dim=4)
    with pytest.raises(ConfigError, match="q_lora_rank"):
        MLAConfig(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, q_lora_rank=0)


def test_deepseek_multi_token_prediction_layers_are_skipped_like_transformers(saved, tmp_path):
    # DeepSeek-V3 checkpoints carry the MTP module as layer n_layers; transformers
    # does not run it either. Any other family with an extra layer is an error.
    from safetensors.numpy import load_file, save_file
    for family, ok in (("deepseek_v3", True), ("olmoe", False)):
        dst = with_config(saved[family], tmp_path / family)
        (dst / "model.safetensors").unlink()
        tensors = load_file(str(saved[family] / "model.safetensors"))
        tensors["model.layers.2.eh_proj.weight"] = np.ones((4, 4), np.float32)
        save_file(tensors, str(dst / "model.safetensors"))
        if ok:
            load_hf(dst)
        else:
            with pytest.raises(UnsupportedConfigError, match="eh_proj"):
                load_hf(dst)


def test_convert_is_reachable_from_a_plain_import_moejax():
    """README usage: ``import moejax`` then ``moejax.convert.load_hf(...)``; safetensors
    (the optional 'convert' extra) is imported only when moejax.convert is first used."""
    import os
    import subprocess
    import sys
    code = ("import sys, moejax; before = 'safetensors' in sys.modules; "
            "fn = moejax.convert.load_hf; print(before, callable(fn), 'moejax.convert' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": "."})
    assert out.returncode == 0 and out.stdout.split() == ["False", "True", "True"], out.stderr


def test_save_hf_of_a_capacity_limited_model_warns_it_exports_dropless(tmp_path):
    cfg = family_configs()["mixtral"]
    cfg = cfg.replace(moe=cfg.moe.replace(capacity_factor=1.0))
    with pytest.warns(UserWarning, match="capacity_factor=1.0 has no Hugging Face equivalent"):
        save_hf(random_model(cfg), cfg, tmp_path / "a")
    loaded, loaded_cfg = load_hf(tmp_path / "a")
    assert loaded_cfg.moe.capacity_factor is None
