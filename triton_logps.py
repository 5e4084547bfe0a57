"""Triton forward of the fused log-prob path: per-token log-sum-exp and target logit, tile by tile.

Each program owns BLOCK_N tokens and walks the vocabulary in BLOCK_V tiles; a tile's logits are computed from BLOCK_D
slices of the hidden size (accumulated in fp32), folded into a running max and sum of exponentials, and dropped:
logits never reach memory. The backward is logps.py's chunked one. Tested on CPU under TRITON_INTERPRET=1 in fp32."""

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_target_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, tgt_ptr, N, V, D, stride_h, stride_w,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    target = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            h = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            z += tl.dot(h, tl.trans(w), input_precision=PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=row_ok)
    tl.store(tgt_ptr + rows, target, mask=row_ok)


def lse_and_target(hidden, weight, labels, lse, target, block_n=64, block_v=128, block_d=64):
    """hidden [N, D], weight [V, D], labels [N] -> fills lse [N] (log-sum-exp) and target [N] (target logit), fp32."""
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    n, d = hidden.shape
    # fp32 inputs: exact fp32 products (tl.dot would otherwise use tf32 on GPU); bf16: the default
    precision = "ieee" if hidden.dtype == torch.float32 else None
    _lse_target_kernel[(triton.cdiv(n, block_n),)](hidden, weight, labels, lse, target, n, weight.shape[0], d,
                                                   hidden.stride(0), weight.stride(0), BLOCK_N=block_n,
                                                   BLOCK_V=block_v, BLOCK_D=block_d, PRECISION=precision)
