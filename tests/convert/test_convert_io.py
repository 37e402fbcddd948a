"""moejax -> Hugging Face files -> moejax without torch: exact round trips per
family and layout, sharded and bfloat16 safetensors, the command line, and
the loader's memory footprint. (Parity with transformers itself is checked
in test_hf_logits.py, which needs torch.)
"""

import json
import tracemalloc

import jax
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import checkpoint
from moejax.config import MLAConfig, MoEConfig, ModelConfig, config_from_dict, config_to_dict
from moejax.convert import load_hf, save_hf
from moejax.convert.__main__ import main as cli_main
from moejax.convert.safetensors_io import INDEX_FILE, TensorReader


def family_configs() -> dict[str, ModelConfig]:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40)
    moe = dict(d_model=32, d_ff=24, num_experts=4, top_k=2)
    all_moe = {**base, "d_ff": 24}  # no dense layer: d_ff is the expert width, as HF has it
    return {
        "mixtral": ModelConfig(**all_moe, moe=MoEConfig(**moe)),
        "qwen2_moe": ModelConfig(**{**base, "n_layers": 3}, attention_bias=True,
                                 ffn_kinds=("dense", "moe", "moe"),
                                 moe=MoEConfig(**moe, norm_topk_prob=False, num_shared_experts=1,
                                               shared_d_ff=20, shared_expert_gate=True)),
        "qwen3_moe": ModelConfig(**{**base, "n_layers": 3}, head_dim=12, qk_norm="head",
                                 ffn_kinds=("moe", "dense", "moe"),
                                 moe=MoEConfig(**moe)),
        "olmoe": ModelConfig(**all_moe, qk_norm="proj", moe=MoEConfig(**moe, norm_topk_prob=False)),
        "deepseek_v3": ModelConfig(
            **{**base, "n_kv_heads": 4}, ffn_kinds=("dense", "moe"),
            mla=MLAConfig(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4,
                          v_head_dim=10),
            moe=MoEConfig(**{**moe, "num_experts": 8}, router="sigmoid", n_group=2, topk_group=1,
                          num_shared_experts=1, shared_d_ff=24, routed_scaling_factor=2.5)),
    }


def rewrite_config(src_config, dst_config, changes: dict) -> None:
    """Write ``src_config`` (a config.json) to ``dst_config`` with ``changes``; None deletes a key."""
    config = json.loads(src_config.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    dst_config.write_text(json.dumps(config))


def random_model(cfg: ModelConfig, seed: int = 0) -> moejax.Transformer:
    """Every variable (norm scales and router biases included) drawn at random."""
    # numpy draws into an abstract model: no per-shape jax compiles.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moejax.Transformer(cfg, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(lambda x: jax.numpy.asarray(rng.normal(size=x.shape).astype(np.float32)),
                        nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def assert_same_variables(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(a)))[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(b)))[0])
    assert len(flat_a) == len(flat_b)
    for path, value in flat_a:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", sorted(family_configs()))
def test_save_then_load_is_exact(family, layout, tmp_path):
    cfg = family_configs()[family]
    model = random_model(cfg, seed=len(family))
    assert save_hf(model, cfg, tmp_path, expert_layout=layout) == family
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == family
    loaded, loaded_cfg = load_hf(tmp_path)
    assert model_fields(loaded_cfg) == model_fields(cfg)
    assert loaded_cfg.name == family
    assert_same_variables(model, loaded)


def test_load_dtype_is_the_compute_dtype_of_the_moe_layers_too(tmp_path):
    cfg = family_configs()["qwen2_moe"]
    save_hf(random_model(cfg), cfg, tmp_path)
    loaded, loaded_cfg = load_hf(tmp_path, dtype="bfloat16")
    assert loaded_cfg.dtype == loaded_cfg.moe.dtype == "bfloat16"
    assert {moe.dtype for moe in loaded.moe_layers} == {jax.numpy.dtype("bfloat16")}


def model_fields(cfg: ModelConfig) -> dict:
    """The config minus its name and the training-only loss settings."""
    data = config_to_dict(cfg)
    del data["name"]
    for key in ("aux_loss_coef", "z_loss_coef", "aux_loss_type", "bias_update_rate"):
        del data["moe"][key]
    return data


def test_sharded_checkpoint_with_index(tmp_path):
    cfg = family_configs()["qwen2_moe"]
    model = random_model(cfg)
    save_hf(model, cfg, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    loaded, _ = load_hf(tmp_path)
    assert_same_variables(model, loaded)


def test_bfloat16_tensors_read_as_float32(tmp_path):
    import jax.numpy as jnp
    from safetensors.flax import save_file
    x = jax.random.normal(jax.random.key(0), (5, 7)).astype(jnp.bfloat16)
    save_file({"w": x, "v": jnp.arange(3.0)}, str(tmp_path / "model.safetensors"))
    with TensorReader(tmp_path) as reader:
        got = reader.get("w")
        assert got.dtype == np.float32 and reader.shape("w") == (5, 7)
        np.testing.assert_array_equal(got, np.asarray(x.astype(jnp.float32)))
        np.testing.assert_array_equal(reader.get("v"), np.arange(3.0, dtype=np.float32))


def test_loader_holds_one_layer_of_tensors_at_a_time(tmp_path):
    # Expert stacks dominate this model; a loader that reads the whole
    # checkpoint into host memory would peak at ~100% of its bytes.
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=256,
                      moe=MoEConfig(d_model=64, d_ff=256, num_experts=8, top_k=2))
    model = random_model(cfg)
    save_hf(model, cfg, tmp_path)
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))))
    load_hf(tmp_path)  # warm-up: first-call tracing allocates Python objects, not tensors
    tracemalloc.start()
    try:
        load_hf(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_layer_experts = 3 * 8 * 64 * 256 * 4
    assert peak < 0.3 * total, (peak, total)
    # one layer's three expert stacks, plus Python bookkeeping well under one more
    assert peak < 2 * one_layer_experts, (peak, one_layer_experts)


def test_cli_from_hf_writes_a_run_dir_and_back(tmp_path):
    cfg = family_configs()["deepseek_v3"]
    model = random_model(cfg)
    save_hf(model, cfg, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')
    assert cli_main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    restored, restored_cfg = checkpoint.load_model(tmp_path / "run")
    assert restored_cfg.mla == cfg.mla and restored_cfg.moe.router == "sigmoid"
    assert_same_variables(model, restored)

    assert cli_main(["--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf2"),
                     "--expert-layout", "fused"]) == 0
    assert_same_variables(model, load_hf(tmp_path / "hf2")[0])
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llama"}')
    assert cli_main(["--from-hf", str(tmp_path / "bad"), "--out", str(tmp_path / "run2")]) == 2


def test_config_dict_round_trip_keeps_mla_and_ffn_kinds():
    for cfg in family_configs().values():
        data = json.loads(json.dumps(config_to_dict(cfg)))
        assert config_from_dict(data) == cfg


def test_block_fp8_weights_are_dequantized(tmp_path):
    # DeepSeek-V3's released format: float8_e4m3 weights with a float32
    # weight_scale_inv per [16, 16] tile here (partial tiles at the edges).
    import jax.numpy as jnp
    import ml_dtypes
    from safetensors.flax import save_file
    from safetensors.numpy import load_file
    cfg = family_configs()["deepseek_v3"]
    save_hf(random_model(cfg), cfg, tmp_path / "float")
    tensors = load_file(str(tmp_path / "float" / "model.safetensors"))
    block = 16
    quantized, expected = {}, {}
    for name, w in tensors.items():
        if w.ndim == 2 and name.endswith("proj.weight"):
            rows, cols = w.shape
            tiles = np.zeros((-(-rows // block), -(-cols // block)), np.float32)
            for i in range(tiles.shape[0]):
                for j in range(tiles.shape[1]):
                    tiles[i, j] = np.abs(w[i * block:(i + 1) * block, j * block:(j + 1) * block]).max() / 448
            scale = np.repeat(np.repeat(tiles, block, 0), block, 1)[:rows, :cols]
            q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
            quantized[name], quantized[name + "_scale_inv"] = jnp.asarray(q), jnp.asarray(tiles)
            expected[name] = q.astype(np.float32) * scale
        else:
            quantized[name] = expected[name] = jnp.asarray(w)
    (tmp_path / "fp8").mkdir()
    save_file(quantized, str(tmp_path / "fp8" / "model.safetensors"))
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    save_file({k: jnp.asarray(v) for k, v in expected.items()}, str(tmp_path / "float" / "model.safetensors"))

    fp8_model, fp8_cfg = load_hf(tmp_path / "fp8")
    float_model, float_cfg = load_hf(tmp_path / "float")
    assert fp8_cfg == float_cfg
    assert_same_variables(fp8_model, float_model)
