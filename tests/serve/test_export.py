"""Serving checkpoints: what is written, that it reads back exactly, and expert byte ranges."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import moejax
from moejax import checkpoint as mckpt
from serve import Engine, ExportError, export
from serve.export import find_tokenizer, key_of
from serve.tensorfile import MappedFile
from serve.tokenizer import load_tokenizer


def _flat(model) -> dict[str, np.ndarray]:
    return {key_of(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]}


def test_export_round_trips_every_variable(micro_model, micro_serving):
    model, cfg = micro_model
    manifest = json.loads((micro_serving / "manifest.json").read_text())
    assert manifest["format"] == "moejax-serving" and manifest["tokenizer"] == {"kind": "bytes"}
    assert sorted(p.name for p in micro_serving.iterdir()) == ["config.json", "experts.safetensors",
                                                              "manifest.json", "model.safetensors"]
    loaded = Engine.load(micro_serving, num_slots=1, max_chunk=4).model
    want, got = _flat(model), _flat(loaded)
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_one_expert_is_one_contiguous_read(micro_model, micro_serving):
    model, cfg = micro_model
    manifest = json.loads((micro_serving / "manifest.json").read_text())
    assert len(manifest["experts"]) == cfg.num_moe_layers
    raw = (micro_serving / "experts.safetensors").read_bytes()
    flat = _flat(model)
    for prefix, entry in manifest["experts"].items():
        for e, (start, end) in enumerate(entry["byte_ranges"]):
            # the bytes of [start, end) are exactly expert e's tensors, in the listed order
            expect = b"".join(flat[f"{prefix}.{n}"][e].tobytes() for n in entry["tensors"])
            assert raw[start:end] == expect, (prefix, e)
    # and the safetensors library reads the file we wrote ourselves
    from safetensors import safe_open
    with safe_open(str(micro_serving / "experts.safetensors"), "np") as f:
        np.testing.assert_array_equal(f.get_tensor("layers.1.ffn.experts.3.w_up"),
                                      flat["layers.1.ffn.experts.w_up"][3])


def test_bfloat16_export_stores_matrices_in_bfloat16(micro_run, micro_serving, tmp_path):
    out = tmp_path / "bf16"
    export(micro_run, out, dtype="bfloat16")
    rest = MappedFile(out / "model.safetensors")
    assert rest.get("layers.0.attn.wq").dtype == ml_dtypes.bfloat16
    assert rest.get("embed").dtype == np.float32                  # the residual stream stays float32
    assert rest.get("layers.0.ffn.router.kernel").dtype == np.float32   # routing decisions stay exact
    experts = MappedFile(out / "experts.safetensors")
    assert experts.get("layers.0.ffn.experts.0.w_gate").dtype == ml_dtypes.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    f32 = MappedFile(micro_serving / "experts.safetensors")
    data_bytes = lambda f: f.path.stat().st_size - f.data_start  # noqa: E731
    assert data_bytes(experts) * 2 == data_bytes(f32)


def test_export_from_a_run_with_only_checkpoints(micro_model, tmp_path):
    """A run killed before its final save: parameters come from the latest train-state checkpoint."""
    model, cfg = micro_model
    run = tmp_path / "run"
    mckpt.save_config(run, cfg)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    manager = mckpt.train_state_manager(run / "checkpoints", keep=2, async_save=False)
    state = {"params": params, "opt_state": optax.adamw(1e-3).init(params), "nonparam": rest}
    mckpt.save_train_state(manager, 7, state, {"step": 7})
    manager.wait_until_finished()
    manager.close()
    export(run, tmp_path / "out")
    got = _flat(Engine.load(tmp_path / "out", num_slots=1, max_chunk=4).model)
    for key, value in _flat(model).items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_tokenizer_json_travels_with_the_checkpoint(micro_run, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "!": 3, "[BOS]": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # a BOS in front, as Llama / Mixtral tokenizers (and training, and transformers) put it
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 4)])
    run = tmp_path / "run"
    import shutil
    shutil.copytree(micro_run, run)
    (run / "tokenizer").mkdir()
    tok.save(str(run / "tokenizer" / "tokenizer.json"))
    # a list, as chat models write it (Llama 3, Qwen MoE chat): every id is kept, not the first
    (run / "tokenizer" / "generation_config.json").write_text('{"eos_token_id": [3, 2]}')
    # the chat template travels too (for /v1/chat/completions), with the special tokens it uses
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }} {% endfor %}"
    (run / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "[BOS]", "eos_token": "!"}))
    export(run, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    special = {"bos_token": "[BOS]", "eos_token": "!"}
    assert manifest["tokenizer"] == {"kind": "hf", "file": "tokenizer.json", "eos_token_id": [3, 2],
                                     "special_tokens": special, "chat_template": template}
    engine = Engine.load(tmp_path / "out", num_slots=1, max_chunk=4)
    assert engine.tokenizer.chat_template.render([{"role": "user", "content": "hello"}]) == "[BOS]hello "
    # no eos_token_id written anywhere: tokenizer_config's eos_token text, looked up ("!" is 3)
    (run / "tokenizer" / "generation_config.json").unlink()
    assert find_tokenizer(run, 256)[0]["eos_token_id"] == 3
    # a base tokenizer without a template still carries its special tokens, for the template
    # --chat-template gives (its {{ bos_token }} rendered empty); a legacy special_tokens_map.json
    # fills in the names tokenizer_config.json lacks, as transformers does
    (run / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[BOS]"}))
    (run / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "hello", "eos_token": {"content": "!", "special": True}}))
    entry = find_tokenizer(run, 256)[0]
    assert "chat_template" not in entry and entry["special_tokens"] == special and entry["eos_token_id"] == 3
    assert load_tokenizer(entry, run / "tokenizer").special_tokens == special
    assert engine.tokenizer.encode("hello world") == [4, 1, 2]
    assert engine.tokenizer.eos_token_ids == (3, 2)
    from serve.offload.tracesim_cli import load_model   # trace-sim of the run directory: the same ids
    assert load_model(run)[1]("hello world") == [4, 1, 2]


def test_export_refuses_what_it_cannot_do(micro_run, tmp_path):
    with pytest.raises(ExportError, match="no config.json"):
        export(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export(micro_run, tmp_path / "exists")
    with pytest.raises(ExportError, match="--dtype"):
        export(micro_run, tmp_path / "o2", dtype="float16")
    with pytest.raises(ExportError, match="--quantize"):
        export(micro_run, tmp_path / "o3", quantize="int4")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    import shutil                    # --force on a folder holding the source would delete it
    shutil.copytree(micro_run, tmp_path / "runs" / "run")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("*"))
    with pytest.raises(ExportError, match="--out must differ from --ckpt"):
        export(tmp_path / "runs" / "run", tmp_path / "runs", force=True)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("*")) == before


def test_int8_export_holds_quantize_experts_weights(micro_model, micro_run, tmp_path):
    model, cfg = micro_model
    out = tmp_path / "int8"
    manifest = export(micro_run, out, quantize="int8")
    assert manifest["quantize"] == "int8"
    loaded = Engine.load(out, num_slots=1, max_chunk=4).model
    assert type(loaded.layers[0].ffn.experts).__name__ == "Int8Experts"
    # the reference: moejax.quantize_experts on the float model, independently of the export
    want = _flat(moejax.quantize_experts(moejax.checkpoint.load_model(micro_run)[0]))
    got = _flat(loaded)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # one expert (int8 weights and float32 scales) is still one contiguous byte range
    raw = (out / "experts.safetensors").read_bytes()
    entry = manifest["experts"]["layers.1.ffn.experts"]
    start, end = entry["byte_ranges"][2]
    assert raw[start:end] == b"".join(want[f"layers.1.ffn.experts.{n}"][2].tobytes() for n in entry["tensors"])
