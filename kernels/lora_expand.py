"""Expand: ``out[t] += sum_p sum_split v[split, t*P + p, :r_i] @ B_i[:, :r_i]^T``, written once.

One program owns a block of consecutive tokens and a block of N. It loops over the distinct adapters
of its token block (listed by the plan), loads each adapter's B tile once, and multiplies it by the
rows of v that selected that adapter (the other rows masked to zero). The sum over a token's slots
and over the shrink's K splits happens in registers in a fixed order; each output element is read
and written by exactly one program, so there are no atomics and results are bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_acc


@triton.jit
def _lora_expand_kernel(
    v_ptr,  # [SPLIT_K, T*P, R] fp32
    b_ptr,  # [L, N, R]
    out_ptr,  # [T, N], added into
    token_adapter_ptr,  # [T, P] int32, -1 = empty
    tile_count_ptr,  # [n_blocks] int32 distinct adapters of each token block
    tile_adapters_ptr,  # [n_blocks, W] int32
    ranks_ptr,  # [L] int32 (HAS_RANKS)
    T,
    N,
    R,
    P,
    W,
    stride_bl,
    stride_bn,
    stride_br,
    stride_ot,
    stride_on,
    HAS_RANKS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    n_adapters = tl.load(tile_count_ptr + i_m)
    if n_adapters == 0:
        return
    o_t = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_t = o_t < T
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    split_stride = T * P * R

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, n_adapters):
        adapter = tl.load(tile_adapters_ptr + i_m * W + i).to(tl.int64)
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + adapter)
        else:
            rank = R
        p_b = b_ptr + adapter * stride_bl + o_n[None, :] * stride_bn
        for r0 in range(0, rank, BLOCK_R):
            o_r = r0 + tl.arange(0, BLOCK_R)
            m_r = o_r < rank
            # This adapter's share of each token's v: the slots that selected it, all K splits.
            b_v = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for p in range(0, P):
                ids = tl.load(token_adapter_ptr + o_t * P + p, mask=m_t, other=-1)
                m_v = (ids == adapter)[:, None] & m_r[None, :]
                p_v = v_ptr + (o_t * P + p)[:, None] * R + o_r[None, :]
                for s in tl.static_range(SPLIT_K):
                    b_v += tl.load(p_v + s * split_stride, mask=m_v, other=0.0)
            b_b = tl.load(p_b + o_r[:, None] * stride_br, mask=m_r[:, None] & m_n[None, :], other=0.0)
            b_acc = dot_acc(b_acc, b_v.to(b_b.dtype), b_b, IEEE)

    p_out = out_ptr + o_t[:, None] * stride_ot + o_n[None, :] * stride_on
    m_out = m_t[:, None] & m_n[None, :]
    b_out = tl.load(p_out, mask=m_out, other=0.0).to(tl.float32) + b_acc
    tl.store(p_out, b_out.to(out_ptr.dtype.element_ty), mask=m_out)


def lora_expand_launch(
    v: torch.Tensor,  # [SPLIT_K, T*P, R] fp32 from the shrink
    lora_b: torch.Tensor,  # [L, N, R]
    out: torch.Tensor,  # [T, N], added into in place
    token_adapter: torch.Tensor,  # [T, P] int32
    tile_count: torch.Tensor,  # [n_blocks] int32
    tile_adapters: torch.Tensor,  # [n_blocks, W] int32
    ranks: torch.Tensor | None,  # [L] int32
    block_m: int,
    config: dict,
) -> None:
    """Launch the expand kernel over a plan's token blocks (see the module docstring)."""
    T, N = out.shape
    _, _, R = lora_b.shape
    n_blocks = tile_count.shape[0]
    if n_blocks == 0 or N == 0 or R == 0:
        return
    grid = (n_blocks, triton.cdiv(N, config["BLOCK_N"]))
    _lora_expand_kernel[grid](
        v,
        lora_b,
        out,
        token_adapter,
        tile_count,
        tile_adapters,
        ranks if ranks is not None else tile_count,  # any pointer: never read without HAS_RANKS
        T,
        N,
        R,
        token_adapter.shape[1],
        tile_adapters.shape[1],
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        out.stride(0),
        out.stride(1),
        HAS_RANKS=ranks is not None,
        IEEE=lora_b.dtype == torch.float32 or lora_b.dtype == torch.float64,
        BLOCK_M=block_m,
        BLOCK_N=config["BLOCK_N"],
        BLOCK_R=config["BLOCK_R"],
        SPLIT_K=v.shape[0],
        num_warps=config["num_warps"],
    )
