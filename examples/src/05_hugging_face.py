# %% [markdown]
# # 05 · Hugging Face checkpoints: import, check, fine-tune, export
#
# moejax reads and writes the Hugging Face layouts of five MoE families (Mixtral,
# Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3). Nothing is downloaded here: the
# notebook writes a small, randomly initialised Qwen3-MoE checkpoint with
# `transformers`, converts it, checks the logits against PyTorch, fine-tunes it a
# few steps in JAX and exports it back, where `transformers` loads it again.
#
# Runs on a CPU in about a minute, and unchanged on a Colab GPU or TPU runtime.

# %%
# Install moejax (with the PyTorch CPU build for the reference model) when it is not importable.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("moejax") is None or importlib.util.find_spec("transformers") is None:
    source = os.environ.get("MOEJAX_SOURCE", "git+https://github.com/moejax/moejax")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"moejax[convert,hf] @ {source}"], check=True)

# %%
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import torch
import transformers
from flax import nnx

import moejax

print(f"jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s); "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
workdir = Path(tempfile.mkdtemp(prefix="moejax-hf-"))

# %% [markdown]
# ## A random Qwen3-MoE checkpoint written by `transformers`

# %%
hf_config = transformers.Qwen3MoeConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256,
    bos_token_id=None, eos_token_id=None, pad_token_id=None)
torch.manual_seed(0)
hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
with torch.no_grad():   # redraw every weight so that a swapped or transposed tensor would show
    for name, param in hf_model.named_parameters():
        param.copy_(1.0 + 0.2 * torch.randn_like(param) if "norm" in name else 0.15 * torch.randn_like(param))
hf_dir = workdir / "qwen3-moe-random"
hf_model.save_pretrained(hf_dir)
print(sorted(p.name for p in hf_dir.iterdir()))

# %% [markdown]
# ## Convert and compare logits

# %%
model, cfg = moejax.convert.load_hf(hf_dir)
print(cfg.name, "| layers:", cfg.n_layers, "| experts:", cfg.moe.num_experts, "top", cfg.moe.top_k)

tokens = np.random.default_rng(0).integers(0, 256, size=(2, 32))
with torch.no_grad():
    ref_logits = hf_model(torch.as_tensor(tokens)).logits.float().numpy()
ours, _ = model(jnp.asarray(tokens, jnp.int32))
ours = np.asarray(ours)
rel_err = np.abs(ours - ref_logits).max() / np.abs(ref_logits).max()
print(f"max relative logit error vs transformers: {rel_err:.2e}")
assert rel_err < 1e-4

fig, ax = plt.subplots(figsize=(4, 4))
ax.scatter(ref_logits.ravel()[::7], ours.ravel()[::7], s=2, alpha=0.4)
ax.set(xlabel="transformers (PyTorch) logit", ylabel="moejax (JAX) logit", title="same checkpoint, same tokens")
plt.show()

# %% [markdown]
# ## Fine-tune a few steps in JAX
#
# A small byte-level task: predict the next byte of a repeated sentence.

# %%
text = np.frombuffer(b"moejax converts Hugging Face MoE checkpoints both ways. " * 40, np.uint8)
windows = np.stack([text[i:i + 65] for i in range(0, 1024, 16)]).astype(np.int32)

optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

@nnx.jit
def train_step(model, optimizer, batch):
    def loss_fn(model):
        logits, aux = model(batch[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        return ce + aux["router_loss"], ce
    (_, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return ce

rng = np.random.default_rng(1)
losses = [float(train_step(model, optimizer, jnp.asarray(windows[rng.choice(len(windows), 8)])))
          for _ in range(30)]
plt.figure(figsize=(5, 3))
plt.plot(losses)
plt.xlabel("step"); plt.ylabel("cross-entropy (nats)"); plt.title("fine-tuning the converted model")
plt.show()
assert losses[-1] < losses[0]

# %% [markdown]
# ## Export back and load with `transformers`

# %%
out_dir = workdir / "qwen3-moe-finetuned"
moejax.convert.save_hf(model, cfg, out_dir)
reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
with torch.no_grad():
    back = reloaded(torch.as_tensor(tokens)).logits.float().numpy()
ours_tuned = np.asarray(model(jnp.asarray(tokens, jnp.int32))[0])
print(f"fine-tuned model, moejax vs transformers after the round trip: "
      f"{np.abs(ours_tuned - back).max() / np.abs(back).max():.2e} relative")
assert np.abs(ours_tuned - back).max() / np.abs(back).max() < 1e-4
