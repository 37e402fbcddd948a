"""backend='auto' resolves per lowering platform: exporting the model for TPU or CUDA
from this CPU host carries the Pallas grouped-matmul kernel, while running it here
uses the XLA path (an explicit 'ragged' dispatch exports without the kernel)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import moejax

TRITON = "__gpu$xla.gpu.triton"
TARGET = {"tpu": "tpu_custom_call", "cuda": TRITON}


def _export(model, platform, tokens, *, grad=False):
    graphdef, state = nnx.split(model)

    def forward(state, tokens):
        logits, aux = nnx.merge(graphdef, state)(tokens)
        return logits, aux

    def loss(state, tokens):
        logits, aux = forward(state, tokens)
        return jnp.mean(logits ** 2) + aux["router_loss"]

    fn = jax.grad(loss) if grad else forward
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
        state, tokens)
    return exported.mlir_module()


def _tiny(**moe_changes):
    cfg = moejax.ModelConfig.preset("tiny").replace(n_layers=1)
    return cfg.replace(moe=cfg.moe.replace(**moe_changes))


TOKENS = jax.ShapeDtypeStruct((2, 16), jnp.int32)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_auto_dispatch_exports_the_pallas_kernel(platform):
    model = moejax.Transformer(_tiny(), rngs=nnx.Rngs(0))
    module = _export(model, platform, TOKENS)
    assert module.count(f"custom_call @{TARGET[platform]}") == 3    # gate, up, down
    # the same model with an explicit XLA dispatch carries no kernel
    ragged = moejax.Transformer(_tiny(dispatch="ragged"), rngs=nnx.Rngs(0))
    assert TARGET[platform] not in _export(ragged, platform, TOKENS)


def test_one_multi_platform_export_carries_each_platforms_kernel():
    model = moejax.Transformer(_tiny(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    exported = jax.export.export(
        jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0]), platforms=["cpu", "tpu", "cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(state, TOKENS)
    module = exported.mlir_module()
    assert module.count(f"custom_call @{TARGET['tpu']}") == 3
    assert module.count(f"custom_call @{TARGET['cuda']}") == 3
    assert exported.platforms == ("cpu", "tpu", "cuda")


def test_auto_dispatch_gradient_exports_the_kernels_for_tpu():
    model = moejax.Transformer(_tiny(), rngs=nnx.Rngs(0))
    module = _export(model, "tpu", TOKENS, grad=True)
    # 3 forward gmm + per matmul a transposed gmm (d_x) and a tgmm (d_w): 9 kernels
    assert module.count(f"custom_call @{TARGET['tpu']}") == 9


def test_int8_experts_export_the_int8_kernel_for_tpu():
    model = moejax.quantize_experts(moejax.Transformer(_tiny(), rngs=nnx.Rngs(0)))
    assert _export(model, "tpu", TOKENS).count(f"custom_call @{TARGET['tpu']}") == 3


def test_auto_dispatch_runs_the_xla_path_here():
    """Run on CPU: the lowered module carries no kernel custom call."""
    model = moejax.Transformer(_tiny(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    text = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(
        state, jnp.zeros((2, 16), jnp.int32)).as_text()
    assert "tpu_custom_call" not in text and "triton" not in text
