"""Models converted from each Hugging Face family decode with a cache exactly as their full
forward runs, and convert with scanned layers as well as unrolled ones."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hf_reference as ref_lib  # noqa: E402
from moejax.convert import load_hf, save_hf  # noqa: E402
from tests.decode_helpers import (assert_dropless, check_prefill_then_steps,  # noqa: E402
                                  check_ragged_batch, forward, rel_err)

# one per family, and YaRN for both attention kinds; qwen2_moe-a has attention biases,
# qwen3_moe per-head q/k norm, olmoe q/k norm over the projection, deepseek_v3 MLA.
DECODE_CASES = ["mixtral-a", "qwen2_moe-a", "qwen3_moe-a", "olmoe-b", "deepseek_v3-a",
                "qwen3_moe-yarn", "deepseek_v3-yarn"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    workdir, built = tmp_path_factory.mktemp("hf_decode"), {}

    def get(name):
        if name not in built:
            built[name] = ref_lib.build(name, workdir, seed=sorted(ref_lib.CASES).index(name))
        return built[name]
    return get


@pytest.mark.parametrize("name", DECODE_CASES)
def test_converted_model_decodes_like_its_full_forward(name, references):
    model, cfg = load_hf(references(name).path)
    assert_dropless(cfg)
    check_prefill_then_steps(model, ref_lib.VOCAB, n=6, m=3)


@pytest.mark.parametrize("name", ["qwen2_moe-a", "deepseek_v3-b"])
def test_converted_model_ragged_batch(name, references):
    model, _ = load_hf(references(name).path)
    check_ragged_batch(model, ref_lib.VOCAB, lengths=(4, 7, 1))


@pytest.mark.parametrize("name", ["qwen2_moe-b", "deepseek_v3-a"])   # mixed dense/MoE groups
def test_scanned_layers_load_and_save_like_unrolled(name, references, tmp_path):
    ref = references(name)
    scanned, cfg = load_hf(ref.path, scan_layers=True)
    assert cfg.scan_layers and hasattr(scanned, "stacks")
    got = np.asarray(forward(scanned, jnp.asarray(ref.tokens, jnp.int32)))
    assert rel_err(got, ref.logits) <= 1e-4
    save_hf(scanned, cfg, tmp_path / "out")
    back, _ = load_hf(tmp_path / "out")          # written by layer index: loads unrolled
    unrolled = np.asarray(forward(back, jnp.asarray(ref.tokens, jnp.int32)))
    assert rel_err(got, unrolled) <= 1e-6   # same weights; scan only changes the XLA program
