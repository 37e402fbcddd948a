"""attend(): the one attention core behind GQA and MLA, with a kernel per platform.

B batch, S queries, T keys, H query heads, G kv heads (H = G*R), K q/k head
dim, V value head dim.

Backends (``impl``), each applied on its own platform only; everywhere else,
and wherever its kernel cannot take the call, the XLA reference runs and the
reason is logged once:

- ``"xla"``: the reference: scores and softmax in float32, einsums in XLA.
- ``"cudnn"`` (cuda): ``jax.nn.dot_product_attention(implementation="cudnn")``,
  cuDNN flash attention. Needs cuDNN found at trace time, bf16/fp16 inputs,
  a head dim that is a multiple of 8 and <= 128, and a causal-aligned mask.
- ``"flash"`` (tpu): ``jax.experimental.pallas.ops.tpu.flash_attention``, the
  Pallas TPU flash kernel that ships with JAX. Needs a causal-aligned mask and
  a length that is a multiple of 128 (its block size, forward and backward).
- ``"auto"``: flash on TPU, cudnn on GPU, xla elsewhere, chosen per lowering
  platform with ``jax.lax.platform_dependent`` so ``jax.export(...,
  platforms=["tpu"])`` from a CPU host carries the TPU kernel.

The kernels take the mask only as "causal" (query i sees keys 0..i, S == T):
the full forward. Decoding against a cache (queries at an offset per row)
runs the XLA reference, which is also the right tool there (S is small).

NaN safety: a key row whose k or v holds a non-finite value is zeroed before
the matmuls (``0 * NaN = NaN`` would otherwise leak through a zero
probability), and every query that is allowed to see such a row gets NaN
back, so non-finite values still propagate where the mask lets them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

log = logging.getLogger(__name__)

IMPLS = ("auto", "xla", "cudnn", "flash")
_MASKED = -1e30          # finite: a fully masked row stays finite (uniform over zeroed values)
_FLASH_BLOCK = 128
_reported: set[str] = set()


def _report(message: str) -> None:
    """Log a backend fallback once per process (never a silent switch).

    Info level: every branch of ``platform_dependent`` is traced whatever the
    platform, so on a CPU host the TPU/GPU reasons are known but moot.
    """
    if message not in _reported:
        _reported.add(message)
        log.info("attend: %s", message)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Causal mask by position: query s sees key t iff 0 <= kv_pos[t] <= q_pos[s].

    ``kv_positions_BT`` is -1 at empty cache slots and padding. ``aligned``
    (static) promises key t is query t (S == T, the same positions): the plain
    causal mask of a full forward, which the flash kernels implement natively.
    """

    q_positions_BS: Int[Array, "B S"]
    kv_positions_BT: Int[Array, "B T"]
    aligned: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @staticmethod
    def causal(positions_BS: Int[Array, "B S"]) -> "Mask":
        return Mask(positions_BS, positions_BS, aligned=True)

    def dense(self) -> Bool[Array, "B S T"]:
        kv_B1T = self.kv_positions_BT[:, None, :]
        return (kv_B1T >= 0) & (kv_B1T <= self.q_positions_BS[:, :, None])


def attend(q_BSHK: Float[Array, "B S H K"], k_BTGK: Float[Array, "B T G K"],
           v_BTGV: Float[Array, "B T G V"], mask_BST: Bool[Array, "B S T"] | Mask, *,
           scale: float, impl: str = "auto") -> Float[Array, "B S H V"]:
    """softmax(q.k * scale, masked) @ v per head; kv head g serves query heads g*R..g*R+R-1."""
    if impl not in IMPLS:
        raise ValueError(f"attend: impl must be one of {IMPLS}, got {impl!r}")
    b, s, h, k = q_BSHK.shape
    _, t, g, _ = k_BTGK.shape
    if h % g or k_BTGK.shape[:3] != v_BTGV.shape[:3] or k_BTGK.shape[-1] != k:
        raise ValueError(f"attend: q {q_BSHK.shape}, k {k_BTGK.shape}, v {v_BTGV.shape} do not fit "
                         "[B,S,H,K], [B,T,G,K], [B,T,G,V] with G dividing H")
    mask = mask_BST if isinstance(mask_BST, Mask) else None
    dense_BST = None if mask is not None else mask_BST
    # NaN safety: zero non-finite key rows, remember who may see them.
    bad_BT = ~(jnp.isfinite(k_BTGK).all(axis=(2, 3)) & jnp.isfinite(v_BTGV).all(axis=(2, 3)))
    k_BTGK = jnp.where(bad_BT[:, :, None, None], 0, k_BTGK)
    v_BTGV = jnp.where(bad_BT[:, :, None, None], 0, v_BTGV)
    if mask is not None and mask.aligned:
        poison_BS = jnp.cumsum(bad_BT.astype(jnp.int32), axis=1) > 0
    else:
        dense_BST = mask.dense() if mask is not None else dense_BST
        poison_BS = (dense_BST & bad_BT[:, None, :]).any(axis=-1)

    def xla(q, kk, v):
        return reference(q, kk, v, dense_BST if dense_BST is not None else mask.dense(), scale=scale)

    branches = {}
    if impl in ("auto", "flash"):
        branches["tpu"] = _flash_or_none(q_BSHK, k_BTGK, v_BTGV, mask, scale) or xla
    if impl in ("auto", "cudnn"):
        branches["cuda"] = _cudnn_or_none(q_BSHK, k_BTGK, v_BTGV, mask, scale) or xla
    if branches:
        out_BSHV = jax.lax.platform_dependent(q_BSHK, k_BTGK, v_BTGV, default=xla, **branches)
    else:
        out_BSHV = xla(q_BSHK, k_BTGK, v_BTGV)
    return jnp.where(poison_BS[:, :, None, None], jnp.nan, out_BSHV).astype(q_BSHK.dtype)


def reference(q_BSHK, k_BTGK, v_BTGV, mask_BST, *, scale: float):
    """The XLA reference: float32 scores and softmax, probabilities cast to v's dtype."""
    b, s, h, k = q_BSHK.shape
    g = k_BTGK.shape[2]
    q_BSGRK = q_BSHK.reshape(b, s, g, h // g, k)
    scores_BGRST = jnp.einsum("bsgrk,btgk->bgrst", q_BSGRK, k_BTGK,
                              preferred_element_type=jnp.float32) * scale
    scores_BGRST = jnp.where(mask_BST[:, None, None], scores_BGRST, _MASKED)
    probs_BGRST = jax.nn.softmax(scores_BGRST, axis=-1).astype(v_BTGV.dtype)
    out_BSGRV = jnp.einsum("bgrst,btgv->bsgrv", probs_BGRST, v_BTGV)
    return out_BSGRV.reshape(b, s, h, v_BTGV.shape[-1])


def _flash_or_none(q_BSHK, k_BTGK, v_BTGV, mask: Mask | None, scale: float):
    """The TPU flash branch for these shapes, or None (reason logged once)."""
    s, t = q_BSHK.shape[1], k_BTGK.shape[1]
    if mask is None or not mask.aligned:
        _report("flash (tpu): mask is not the plain causal mask (decoding against a cache); using xla")
        return None
    if s != t or s % _FLASH_BLOCK:
        # the kernel's backward keeps its softmax statistics in 128-wide blocks:
        # shorter blocks trace (forward) but fail in the gradient
        _report(f"flash (tpu): length {s} is not a multiple of {_FLASH_BLOCK}; using xla")
        return None
    return functools.partial(_flash, scale=scale, block=_FLASH_BLOCK)


def _flash(q_BSHK, k_BTGK, v_BTGV, *, scale: float, block: int):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    h, g = q_BSHK.shape[2], k_BTGK.shape[2]
    width = max(q_BSHK.shape[-1], v_BTGV.shape[-1])   # kernel needs K == V: zero-pad
    v_dim = v_BTGV.shape[-1]

    def heads_first(x_BTGX, repeat):
        x_BTGX = jnp.pad(x_BTGX, ((0, 0),) * 3 + ((0, width - x_BTGX.shape[-1]),))
        return jnp.repeat(x_BTGX, repeat, axis=2).transpose(0, 2, 1, 3)
    blocks = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                           block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block,
                           block_q_dkv=block, block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
    out_BHSX = fa.flash_attention(heads_first(q_BSHK, 1), heads_first(k_BTGK, h // g),
                                  heads_first(v_BTGV, h // g), causal=True, sm_scale=scale,
                                  block_sizes=blocks)
    return out_BHSX.transpose(0, 2, 1, 3)[..., :v_dim]


@functools.cache
def cudnn_available() -> bool:
    """Whether cuDNN can be found on this host (the cudnn path traces only then)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        check_cudnn_version()
        return True
    except Exception:  # noqa: BLE001 - any failure means: not here
        return False


def _cudnn_or_none(q_BSHK, k_BTGK, v_BTGV, mask: Mask | None, scale: float):
    """The cuDNN branch for these inputs, or None (reason logged once)."""
    k = q_BSHK.shape[-1]
    if mask is None or not mask.aligned:
        _report("cudnn (cuda): mask is not the plain causal mask (decoding against a cache); using xla")
        return None
    if q_BSHK.dtype not in (jnp.bfloat16, jnp.float16):
        _report(f"cudnn (cuda): cuDNN flash attention takes bf16/fp16, not {q_BSHK.dtype}; using xla")
        return None
    if k % 8 or k > 128 or v_BTGV.shape[-1] != k:
        _report(f"cudnn (cuda): head dims q/k {k}, v {v_BTGV.shape[-1]} (need equal, "
                "a multiple of 8, <= 128); using xla")
        return None
    if not cudnn_available():
        _report("cudnn (cuda): cuDNN not found on this host at trace time; using xla")
        return None
    return functools.partial(_cudnn, scale=scale)


def _cudnn(q_BSHK, k_BTGK, v_BTGV, *, scale: float):
    return jax.nn.dot_product_attention(q_BSHK, k_BTGK, v_BTGV, scale=scale, is_causal=True,
                                        implementation="cudnn")
