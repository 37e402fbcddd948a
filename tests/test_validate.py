"""Inputs of the wrong dtype, shape or range are refused at the library boundary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import validate

MOE = moejax.MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2)
CFG = moejax.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                         moe=MOE)


def random_values(module_fn):
    """A module with numpy-drawn values (no per-initializer compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(module_fn))
    rng = np.random.default_rng(0)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda x: jnp.asarray((0.2 * rng.normal(size=x.shape)).astype(x.dtype)), nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def layer():
    return random_values(lambda: moejax.MoE(MOE, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def model():
    return random_values(lambda: moejax.Transformer(CFG, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_moe_refuses_non_float_input(layer, dtype):
    with pytest.raises(TypeError, match=f"floating-point x, got {jnp.dtype(dtype)}"):
        layer(jnp.ones((2, 3, 16), dtype))


@pytest.mark.parametrize("shape", [(0, 3, 16), (2, 0, 16)])
def test_moe_refuses_an_empty_batch(layer, shape):
    with pytest.raises(ValueError, match="empty batch"):
        layer(jnp.ones(shape, jnp.float32))


@pytest.mark.parametrize("shape", [(2, 3, 15), (6, 16)])
def test_moe_refuses_other_shapes(layer, shape):
    with pytest.raises(ValueError, match=r"\[B, S, 16\]"):
        layer(jnp.ones(shape, jnp.float32))


def test_moe_keeps_a_float_dtype(layer):
    y, _ = jax.jit(lambda x: layer(x))(jnp.ones((1, 2, 16), jnp.bfloat16))  # static checks still run
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 2, 16)


@pytest.mark.parametrize("tokens,error,needle", [
    (jnp.ones((2, 3), jnp.float32), TypeError, "integer ids, got float32"),
    (jnp.ones((2, 3), jnp.bool_), TypeError, "integer ids, got bool"),
    (jnp.ones((6,), jnp.int32), ValueError, r"\[batch, seq\]"),
    (jnp.zeros((0, 4), jnp.int32), ValueError, "hold no token"),
    (jnp.asarray([[1, 2], [3, 32]]), ValueError, r"token id 32 is outside the vocabulary \[0, 32\)"),
    (jnp.asarray([[1, -1]]), ValueError, "token id -1 is outside"),
    (np.asarray([[5, 1000]], np.int64), ValueError, "token id 1000"),
])
def test_transformer_refuses_bad_tokens(model, tokens, error, needle):
    with pytest.raises(error, match=needle):
        model(tokens)


def test_under_jit_out_of_range_ids_follow_jnp_take_as_documented(model):
    """Traced ids cannot be checked; the docstring says what happens instead."""
    logits = jax.jit(lambda t: model(t)[0])
    high = logits(jnp.asarray([[3, 32]]))
    assert np.isnan(np.asarray(high[0, 1])).all()  # and it spreads: masked attention is 0 * NaN
    wrapped = logits(jnp.asarray([[3, -1]]))
    last = logits(jnp.asarray([[3, 31]]))
    np.testing.assert_array_equal(np.asarray(wrapped), np.asarray(last))


def test_ids_closed_over_by_a_jitted_function_are_checked_not_a_tracer_error(model):
    """Concrete ids inside a trace (a loss closing over its batch): checked as outside jit
    (min / max were staged as tracers and int() raised ConcretizationTypeError)."""
    for ids in (jnp.asarray([[3, 31]]), np.asarray([[3, 31]], np.int32)):
        got = jax.jit(lambda: model(ids)[0])()
        np.testing.assert_allclose(np.asarray(got), np.asarray(model(ids)[0]), rtol=1e-6, atol=1e-6)
    bad = jnp.asarray([[3, 32]])
    with pytest.raises(ValueError, match="token id 32 is outside"):
        jax.jit(lambda: model(bad)[0])()


def test_in_range_ids_of_any_integer_dtype_pass(model):
    for dtype in (np.int32, np.int64, np.uint16, np.uint8):
        validate.token_ids(np.asarray([[0, 31, 7]], dtype), CFG.vocab_size)


def test_check_writable_dir(tmp_path):
    validate.check_writable_dir(tmp_path / "new" / "deeper")  # creatable
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        validate.check_writable_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="is not a directory"):
        validate.check_writable_dir(tmp_path / "f" / "below")
    with pytest.raises(ValueError, match="cannot write in '/proc'"):
        validate.check_writable_dir("/proc/moejax-test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe left nothing


def test_builtin_ffn_kinds_known_to_the_config_match_the_registry():
    """moejax.config knows the built-in kinds' needs so that configs validate without jax."""
    from moejax.config import BUILTIN_FFN_KIND_NEEDS
    from moejax.layers import FFN_KINDS
    assert {k: FFN_KINDS[k].needs for k in BUILTIN_FFN_KIND_NEEDS} == BUILTIN_FFN_KIND_NEEDS


def test_configs_and_cli_checks_import_no_jax():
    import subprocess
    import sys
    code = ("import sys, moejax.config, moejax.convert, train.start, train.cli; "
            "moejax.ModelConfig.preset('tiny').replace(n_layers=3); "
            "print(sorted(m for m in ('jax', 'flax', 'orbax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "PYTHONPATH": "."})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_extend_refuses_bad_real_ids_and_ignores_padding(model):
    cache = model.init_cache(batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="token id 99"):
        model.extend(jnp.asarray([[1, 99]]), cache)
    with pytest.raises(TypeError, match="integer ids"):
        model.extend(jnp.ones((1, 2), jnp.float32), cache)
