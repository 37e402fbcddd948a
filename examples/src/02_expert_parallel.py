# %% [markdown]
# # 02 · Expert parallelism on a device mesh
#
# The same model code runs on one device or many: a mesh names the axes
# (`data`, `fsdp`, `expert`, `tensor`), the logical-axis rules place every
# parameter, and the MoE layer exchanges tokens between the devices that own
# the experts. On a CPU this notebook makes 8 virtual devices; on a Colab TPU or
# GPU runtime it uses the real chips.

# %%
# Install moejax when it is not importable.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("moejax") is None:
    source = os.environ.get("MOEJAX_SOURCE", "git+https://github.com/moejax/moejax")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"moejax[train] @ {source}"], check=True)

# %%
import os
# 8 virtual devices when JAX runs on the CPU; ignored by TPU/GPU backends. Must precede `import jax`.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import moejax
from moejax import sharding

n = jax.device_count()
print(f"{n} {jax.default_backend()} device(s): {jax.devices()[0].device_kind}")

# %% [markdown]
# ## A mesh that fits the devices at hand
#
# Experts are split over the `expert` axis (up to 4 devices that divide the 8
# experts of the `tiny` preset), the remaining factor goes to `data`.

# %%
cfg = moejax.ModelConfig.preset("tiny")
expert_size = max(d for d in (1, 2, 4) if n % d == 0 and cfg.moe.num_experts % d == 0)
spec = f"data={n // expert_size},expert={expert_size}"
mesh = sharding.make_mesh(spec)
print("mesh:", dict(mesh.shape))

model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
sharding.shard_model(model, mesh)

# %% [markdown]
# ## Where the parameters live
#
# Each routed-expert weight `[E, D, F]` is split along its expert dimension:
# device *d* holds a contiguous block of experts. The plot shows, for the first
# MoE layer, which device holds which expert.

# %%
w_gate = model.moe_layers[0].experts.w_gate[...]
print("w_gate", w_gate.shape, "sharding:", w_gate.sharding.spec)
owner = np.zeros((n, cfg.moe.num_experts))
for shard in w_gate.addressable_shards:
    experts = range(*shard.index[0].indices(cfg.moe.num_experts))
    owner[shard.device.id % n, list(experts)] = 1
plt.figure(figsize=(5, 3))
plt.imshow(owner, cmap="Blues", aspect="auto")
plt.xlabel("expert"); plt.ylabel("device"); plt.title("experts held by each device (layer 0)")
plt.show()

# %% [markdown]
# ## One sharded training step
#
# The batch is split over the token axes; the step is one `jit` with the
# same code as on a single device.

# %%
rng = np.random.default_rng(0)
batch = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2 * n, 65)), jnp.int32)

with jax.set_mesh(mesh):
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
        def loss_fn(model):
            logits, aux = model(batch[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
            return ce + aux["router_loss"], (ce, aux)
        (_, (ce, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return ce, aux

    losses = []
    for _ in range(3):
        ce, aux = train_step(model, optimizer, batch)
        losses.append(float(ce))
print("loss per step:", [round(l, 3) for l in losses])
print("expert load of layer 0 (fraction of tokens per expert):", np.round(np.asarray(aux["expert_load"][0]), 3))

# %% [markdown]
# ## Bytes each exchange moves
#
# One forward pass of a sharded MoE layer reports `dispatch_bytes` (what crossed
# devices, there and back) and `dispatch_min_bytes` (the least any exchange must
# move for this routing). Fixed `all_to_all` buffers are sized for the worst case
# when dropless; a capacity factor shrinks them (and may drop tokens); the ragged
# exchange (TPU/GPU) sends exactly the payload.

# %%
def exchange_bytes(exchange, capacity_factor):
    layer_cfg = moejax.MoEConfig(d_model=128, d_ff=256, num_experts=8, top_k=2,
                                 capacity_factor=capacity_factor, ep_exchange=exchange)
    layer = moejax.MoE(layer_cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (n, 256, 128))
    with jax.set_mesh(mesh):
        sharding.shard_model(layer, mesh)
        _, aux = nnx.jit(lambda m, x: m(x))(layer, x)
    return float(aux["dispatch_bytes"]), float(aux["dispatch_min_bytes"]), float(aux["dropped_fraction"])

cases = [("all_to_all", None), ("all_to_all", 1.25)]
if jax.default_backend() in ("tpu", "gpu"):
    cases.append(("ragged", None))
rows = {f"{ex}\n{'dropless' if cf is None else f'cf={cf}'}": exchange_bytes(ex, cf) for ex, cf in cases}
labels = list(rows)
plt.figure(figsize=(6, 3))
plt.bar(np.arange(len(labels)) - 0.2, [rows[k][0] / 1e6 for k in labels], 0.4, label="moved")
plt.bar(np.arange(len(labels)) + 0.2, [rows[k][1] / 1e6 for k in labels], 0.4, label="minimum for this routing")
plt.xticks(range(len(labels)), labels); plt.ylabel("MB per forward pass"); plt.legend()
plt.title(f"token exchange on mesh {spec}")
plt.show()
for k in labels:
    print(k.replace("\n", " "), f"dropped {rows[k][2]:.1%}")
