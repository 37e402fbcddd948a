"""The transformers MoE block (PyTorch, CPU) with a moejax layer's weights, for benchmarks.

Torch and transformers come from the optional ``hf`` extra; ``available()``
says whether they import, and nothing else here runs without them.

The block is transformers' ``Qwen3MoeSparseMoeBlock`` (softmax router, top-k,
optional renormalisation, SwiGLU experts stored as ``gate_up_proj [E, 2F, D]``
and ``down_proj [E, D, F]``), the same function as ``moejax.MoE`` without
shared experts. Its experts run the implementation named by
``config._experts_implementation`` (transformers/integrations/moe.py,
``@use_experts_implementation``): 'eager' is the per-expert Python loop of the
model file; 'grouped_mm' sorts the (token, slot) pairs by expert and runs
``torch.nn.functional.grouped_mm`` (a CPU kernel since torch 2.9).
"""

from __future__ import annotations

import numpy as np


def available() -> str | None:
    """None when torch and transformers import, else the reason they do not."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return f"{err} (install the 'hf' extra: pip install -e '.[hf]')"
    return None


def torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def moe_block(layer, implementation: str, dtype: str):
    """transformers' Qwen3-MoE sparse block holding ``layer``'s router and expert weights."""
    import torch
    import transformers

    cfg = layer.cfg
    hf_cfg = transformers.Qwen3MoeConfig(
        hidden_size=cfg.d_model, moe_intermediate_size=cfg.d_ff, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, norm_topk_prob=cfg.norm_topk_prob, hidden_act="silu",
        experts_implementation=implementation)
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(hf_cfg)
    experts = layer.experts  # float32 master weights
    w_gate_EDF, w_up_EDF, w_down_EFD = (np.asarray(w[...], np.float32)
                                        for w in (experts.w_gate, experts.w_up, experts.w_down))
    gate_up_E2FD = np.concatenate([w_gate_EDF, w_up_EDF], axis=2).transpose(0, 2, 1)
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(np.asarray(layer.router.kernel[...]).T.copy()))
        block.experts.gate_up_proj.copy_(torch.from_numpy(np.ascontiguousarray(gate_up_E2FD)))
        block.experts.down_proj.copy_(torch.from_numpy(np.ascontiguousarray(w_down_EFD.transpose(0, 2, 1))))
    return block.to(torch_dtype(dtype))


def grad_step(block, x_BSD: np.ndarray, ct_BSD: np.ndarray, dtype: str):
    """() -> None: forward + backward (grads of sum(y * ct) w.r.t. x and every parameter)."""
    import torch

    x = torch.from_numpy(np.array(x_BSD, np.float32)).to(torch_dtype(dtype)).requires_grad_(True)
    ct = torch.from_numpy(np.array(ct_BSD, np.float32)).to(torch_dtype(dtype))

    def step():
        x.grad = None
        for p in block.parameters():
            p.grad = None
        block(x).backward(ct)
    return step


def forward(block, x_BSD: np.ndarray, dtype: str) -> np.ndarray:
    import torch
    with torch.no_grad():
        y = block(torch.from_numpy(np.array(x_BSD, np.float32)).to(torch_dtype(dtype)))
    return y.float().numpy()


def matmul(n: int, dtype: str):
    """() -> None: one [n, n] @ [n, n] product (the peak to compare against)."""
    import torch
    a = torch.randn(n, n).to(torch_dtype(dtype))
    b = torch.randn(n, n).to(torch_dtype(dtype))
    return lambda: torch.mm(a, b)
