"""float64 numpy per-group loops: the independent reference for the gmm kernel tests."""

import numpy as np


def group_bounds(group_sizes, m):
    ends = np.minimum(np.cumsum(group_sizes), m)
    return list(zip(np.concatenate([[0], ends[:-1]]), ends))


def gmm_np(lhs_MK, rhs_GKN, group_sizes):
    lhs, rhs = np.asarray(lhs_MK, np.float64), np.asarray(rhs_GKN, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    for g, (start, end) in enumerate(group_bounds(group_sizes, lhs.shape[0])):
        out[start:end] = lhs[start:end] @ rhs[g]
    return out


def tgmm_np(lhs_MK, grad_MN, group_sizes):
    lhs, grad = np.asarray(lhs_MK, np.float64), np.asarray(grad_MN, np.float64)
    out = np.zeros((len(group_sizes), lhs.shape[1], grad.shape[1]))
    for g, (start, end) in enumerate(group_bounds(group_sizes, lhs.shape[0])):
        out[g] = lhs[start:end].T @ grad[start:end]
    return out


def gmm_vjp_np(lhs_MK, rhs_GKN, group_sizes, d_out_MN):
    """(d_lhs, d_rhs) of gmm: per-group d_out @ rhs^T and lhs^T @ d_out."""
    rhs_GNK = np.swapaxes(np.asarray(rhs_GKN, np.float64), 1, 2)
    return gmm_np(d_out_MN, rhs_GNK, group_sizes), tgmm_np(lhs_MK, d_out_MN, group_sizes)


def tgmm_vjp_np(lhs_MK, grad_MN, group_sizes, d_out_GKN):
    """(d_lhs, d_grad) of tgmm: per-group grad @ d_out^T and lhs @ d_out."""
    d_out_GNK = np.swapaxes(np.asarray(d_out_GKN, np.float64), 1, 2)
    return gmm_np(grad_MN, d_out_GNK, group_sizes), gmm_np(lhs_MK, d_out_GKN, group_sizes)


# Relative tolerance per output dtype: a few ulps of the stored result (inputs are
# exact in their dtype and every kernel accumulates in float32).
RTOL = {"float32": 2e-5, "bfloat16": 2 * 2.0 ** -8}


def assert_close(got, want, dtype, what):
    got = np.asarray(got, np.float64)
    rtol = RTOL[np.dtype(dtype).name]
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)
