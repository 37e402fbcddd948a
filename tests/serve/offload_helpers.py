"""Small models and stores shared by the offload tests."""

import numpy as np
from flax import nnx

import moejax
from serve.offload.offloaded import moe_of
from serve.offload.store import DiskStore, HostStore

EXPERT_TENSORS = ("w_gate", "w_up", "w_down")


def small_model(num_experts=6, top_k=2, n_layers=3, shared=0, seed=0, kinds=None, memory=None,
                scan_layers=False, **moe):
    moe_cfg = moejax.MoEConfig(d_model=32, d_ff=48, num_experts=num_experts, top_k=top_k,
                               num_shared_experts=shared, **moe)
    cfg = moejax.ModelConfig(vocab_size=256, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                             d_ff=64, moe=moe_cfg, max_seq_len=64, memory=memory, scan_layers=scan_layers,
                             ffn_kinds=kinds or ("dense",) * (n_layers > 2) + ("moe",) * min(n_layers, 2))
    return moejax.Transformer(cfg, rngs=nnx.Rngs(seed))


def stacked_experts(model):
    moes = [moe_of(b.ffn) for b in model.layers]
    return [{n: np.asarray(getattr(m[0].experts, n)[...]) for n in EXPERT_TENSORS}
            for m in moes if m is not None]


def host_store(model, pin=True):
    return HostStore(stacked_experts(model), pin=pin)


def disk_store(model, path):
    """Experts of ``model`` written one tensor per expert per layer, then memory-mapped."""
    from safetensors.numpy import save_file
    tensors, names = {}, []
    for layer, stacked in enumerate(stacked_experts(model)):
        per_layer = []
        for e in range(stacked["w_gate"].shape[0]):
            entry = {n: f"layers.{layer}.experts.{e}.{n}" for n in EXPERT_TENSORS}
            for n, t in entry.items():
                tensors[t] = np.ascontiguousarray(stacked[n][e])
            per_layer.append(entry)
        names.append(per_layer)
    save_file(tensors, str(path))
    return DiskStore(path, names)
