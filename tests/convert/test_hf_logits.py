"""Logit parity with transformers for every supported family (float32, CPU).

For each case: a tiny random transformers model is saved; ``load_hf`` reads it
(per-expert layout from ``save_pretrained`` and the fused 3-D layout) and must
reproduce the PyTorch logits; ``save_hf`` writes it back and
``from_pretrained`` must again give the same logits. Error metric:
``max |ours - ref| / max |ref|`` over the [B, S, V] batch, bound 1e-4.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hf_reference as ref_lib  # noqa: E402
from moejax.convert import load_hf, save_hf  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def references(workdir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = ref_lib.build(name, workdir, seed=sorted(ref_lib.CASES).index(name))
        return cache[name]
    return get


# One jitted function for the module: models of the same config share a compile.
_forward = jax.jit(lambda model, tokens: model(tokens)[0])


def moejax_logits(model, tokens):
    return np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32)))


@pytest.mark.parametrize("name", sorted(ref_lib.CASES))
def test_load_hf_matches_transformers(name, references, workdir):
    ref = references(name)
    model, cfg = load_hf(ref.path)
    assert cfg.name == ref.model_type
    err = ref_lib.rel_err(moejax_logits(model, ref.tokens), ref.logits)
    assert err <= TOL, f"{name}: per-expert checkpoint, rel err {err:.2e}"

    fused_dir = ref_lib.save_fused(ref, workdir / f"{name}-fused")
    fused_model, fused_cfg = load_hf(fused_dir)
    assert fused_cfg == cfg
    err = ref_lib.rel_err(moejax_logits(fused_model, ref.tokens), ref.logits)
    assert err <= TOL, f"{name}: fused checkpoint, rel err {err:.2e}"


@pytest.mark.parametrize("name", sorted(ref_lib.CASES))
def test_save_hf_round_trip_through_from_pretrained(name, references, workdir):
    ref = references(name)
    model, cfg = load_hf(ref.path)
    layout = "fused" if name.endswith("-b") else "per_expert"
    out = workdir / f"{name}-saved"
    assert save_hf(model, cfg, out, expert_layout=layout) == ref.model_type
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(ref.model)
    err = ref_lib.rel_err(ref_lib.hf_logits(reloaded, ref.tokens), ref.logits)
    assert err <= TOL, f"{name}: save_hf ({layout}) -> from_pretrained, rel err {err:.2e}"
    # And moejax reads its own output back to the same config.
    again, cfg_again = load_hf(out)
    assert cfg_again == cfg


@pytest.mark.parametrize("name", ["mixtral-a", "qwen2_moe-b", "qwen3_moe-a", "olmoe-b", "deepseek_v3-a"])
def test_greedy_generation_matches_transformers(name, references):
    ref = references(name)
    new = 20
    prompt = ref.tokens[:, :ref_lib.SEQ - new]
    # An explicit all-ones mask: otherwise generate() treats prompt tokens equal
    # to pad_token_id as padding.
    prompt_t = torch.as_tensor(prompt)
    hf_out = ref.model.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), max_new_tokens=new,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    hf_tokens = hf_out[:, prompt.shape[1]:].numpy()
    assert hf_tokens.shape == (prompt.shape[0], new)

    # Plain greedy loop over model(tokens) on a fixed-length buffer (the test's
    # token shape, so no new compile); causal attention makes the zeros after
    # position t irrelevant to the logits at t.
    model, _ = load_hf(ref.path)
    buf = np.zeros(ref.tokens.shape, np.int32)
    buf[:, :prompt.shape[1]] = prompt
    for t in range(prompt.shape[1], buf.shape[1]):
        buf[:, t] = np.argmax(moejax_logits(model, buf)[:, t - 1], axis=-1)
    np.testing.assert_array_equal(buf[:, prompt.shape[1]:], hf_tokens)


def test_sharded_hf_checkpoint(references, workdir):
    ref = references("qwen2_moe-a")
    path = workdir / "qwen2_moe-a-sharded"
    ref.model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    model, _ = load_hf(path)
    err = ref_lib.rel_err(moejax_logits(model, ref.tokens), ref.logits)
    assert err <= TOL, f"sharded checkpoint, rel err {err:.2e}"


def test_bfloat16_hf_checkpoint(references, workdir):
    # bf16 on disk, float32 compute on both sides: the reference is transformers
    # reading the same bf16 file into float32.
    import copy
    ref = references("mixtral-a")
    path = workdir / "mixtral-a-bf16"
    copy.deepcopy(ref.model).to(torch.bfloat16).save_pretrained(path)
    upcast = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = ref_lib.hf_logits(upcast, ref.tokens)
    model, _ = load_hf(path)
    err = ref_lib.rel_err(moejax_logits(model, ref.tokens), expected)
    assert err <= TOL, f"bf16 checkpoint, rel err {err:.2e}"


@pytest.mark.parametrize("model_type", sorted(ref_lib.CONFIG_CLASSES))
def test_absent_keys_take_the_transformers_defaults(model_type, references, workdir):
    import json
    from moejax.convert import read_hf_config
    ref = references(f"{model_type}-a")
    config = json.loads((ref.path / "config.json").read_text())
    deepseek_keys = ("routed_scaling_factor", "n_group", "topk_group", "n_shared_experts",
                     "first_k_dense_replace", "q_lora_rank")
    for key in ("rms_norm_eps", "rope_theta", "rope_parameters", "norm_topk_prob", "tie_word_embeddings",
                "max_position_embeddings", *(deepseek_keys if model_type == "deepseek_v3" else ())):
        config.pop(key, None)
    path = workdir / f"{model_type}-defaults"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    cfg, _, _ = read_hf_config(path)
    defaults = ref_lib.CONFIG_CLASSES[model_type]()
    assert cfg.rms_norm_eps == defaults.rms_norm_eps
    assert cfg.rope_theta == defaults.rope_parameters["rope_theta"]
    assert cfg.tie_embeddings == defaults.tie_word_embeddings
    assert cfg.max_seq_len == defaults.max_position_embeddings
    assert cfg.moe.norm_topk_prob == getattr(defaults, "norm_topk_prob", True)
    if model_type == "deepseek_v3":   # not neutral values: transformers scales by 2.5, routes in 8 groups
        assert (cfg.moe.routed_scaling_factor, cfg.moe.n_group, cfg.moe.topk_group, cfg.moe.num_shared_experts,
                cfg.mla.q_lora_rank) == (defaults.routed_scaling_factor, defaults.n_group, defaults.topk_group,
                                         defaults.n_shared_experts, defaults.q_lora_rank)
        # first_k_dense_replace=3 in a 2-layer model: every layer dense, as in transformers
        assert cfg.ffn_kinds == tuple("dense" if i < defaults.first_k_dense_replace else "moe"
                                      for i in range(cfg.n_layers))


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16},
    {"rope_type": "default"},
], ids=["yarn", "default"])
def test_rope_scaling_overrides_rope_parameters_as_in_transformers(rope_scaling, references, workdir):
    # transformers (4.x knows only rope_scaling; 5.x lets it replace rope_parameters whole)
    # builds its RoPE from rope_scaling when config.json has both: so must moejax.
    import json
    from moejax.convert import read_hf_config
    ref = references("qwen3_moe-yarn")
    config = json.loads((ref.path / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn"
    config["rope_scaling"] = rope_scaling
    path = workdir / f"qwen3_moe-both-ropes-{rope_scaling['rope_type']}"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    cfg, _, _ = read_hf_config(path)
    theirs = transformers.AutoConfig.from_pretrained(path).rope_parameters
    assert theirs["rope_type"] == rope_scaling["rope_type"]
    assert cfg.rope_theta == theirs["rope_theta"]
    if theirs["rope_type"] == "default":
        assert cfg.rope_yarn is None
    else:
        assert (cfg.rope_yarn.factor, cfg.rope_yarn.original_max_position_embeddings, cfg.rope_yarn.beta_fast,
                cfg.rope_yarn.truncate) == (theirs["factor"], theirs["original_max_position_embeddings"],
                                            theirs["beta_fast"], theirs.get("truncate", True))


def test_tied_config_with_its_own_lm_head(references, workdir):
    # Checkpoints may store lm_head.weight under tie_word_embeddings=true. transformers ties
    # an exact copy of the embedding but keeps a different head untied: dropping that head
    # (as a tied moejax model does) would change every logit, so it is refused by name.
    from safetensors.numpy import load_file, save_file
    from moejax.convert import UnsupportedConfigError
    ref = references("mixtral-b")
    assert ref.model.config.tie_word_embeddings
    tensors = load_file(str(ref.path / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]

    def with_head(name, head):
        path = workdir / f"mixtral-b-tied-head-{name}"
        path.mkdir()
        save_file({**tensors, "lm_head.weight": head}, str(path / "model.safetensors"))
        (path / "config.json").write_text((ref.path / "config.json").read_text())
        return path

    _, cfg = load_hf(with_head("copy", embed.copy()))     # the embedding again: tied, as transformers
    assert cfg.tie_embeddings
    path = with_head("other", np.random.default_rng(0).normal(size=embed.shape).astype(np.float32))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = ref_lib.hf_logits(hf, ref.tokens)
    assert ref_lib.rel_err(expected, ref.logits) > 0.1      # transformers uses the stored head
    with pytest.raises(UnsupportedConfigError, match="tie_word_embeddings"):
        load_hf(path)


def test_yarn_without_factor_scales_by_the_default_max_positions(references, workdir):
    # transformers' YaRN takes factor = max_position_embeddings / original_max_position_embeddings
    # when factor is null, with the family's default max_position_embeddings when that is absent too.
    import json
    from moejax.convert import read_hf_config
    ref = references("qwen3_moe-yarn")
    config = json.loads((ref.path / "config.json").read_text())
    config.pop("max_position_embeddings")
    config["rope_parameters"]["factor"] = None        # null: inferred (transformers 5 needs the key)
    path = workdir / "qwen3_moe-yarn-no-factor"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    cfg, _, _ = read_hf_config(path)
    theirs = transformers.AutoConfig.from_pretrained(path)
    original = config["rope_parameters"]["original_max_position_embeddings"]
    assert cfg.rope_yarn.factor == theirs.max_position_embeddings / original


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_absent_num_key_value_heads_takes_the_transformers_default(model_type, references, workdir):
    # The defaults differ by family (Mixtral 8, Qwen2-MoE 16, Qwen3-MoE 4, OLMoE one per head).
    import json
    from moejax.convert import read_hf_config
    config = json.loads((references(f"{model_type}-a").path / "config.json").read_text())
    del config["num_key_value_heads"]
    config.update(num_attention_heads=32, hidden_size=64)      # 32: no family default
    path = workdir / f"{model_type}-no-kv-heads"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    cfg, _, _ = read_hf_config(path)
    assert cfg.n_kv_heads == transformers.AutoConfig.from_pretrained(path).num_key_value_heads
