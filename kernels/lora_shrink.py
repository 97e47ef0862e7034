"""Shrink: ``v[split, t*P + p, :r_i] = w[t, p] * s_i * x[t, Ksplit] @ A_i[:r_i, Ksplit]^T``.

Segment-gather: one program owns a tile of (token, slot) rows that all selected the same adapter
(from any sequence), one rank chunk and one K split. It loads the adapter's A tiles once and applies
them to every row of the tile; rows are gathered from x by token index. Rank chunks at or beyond the
adapter's rank exit at once, so no arithmetic is spent on rows an adapter does not have (beyond the
16-wide minimum of a tensor-core dot).
"""

import torch
import triton
import triton.language as tl

from ._common import dot_acc


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [L, R, K]
    v_ptr,  # [SPLIT_K, T*P, R] fp32 out
    sorted_rows_ptr,  # [T*P] int32 rows t*P+p grouped by adapter
    tile_adapter_ptr,  # [n_tiles] int32
    tile_start_ptr,  # [n_tiles] int32
    tile_end_ptr,  # [n_tiles] int32
    row_weight_ptr,  # [T*P] fp32 fusion weight of each row
    ranks_ptr,  # [L] int32 (HAS_RANKS)
    scales_ptr,  # [L] fp32 (HAS_SCALES)
    K,
    R,
    P,
    num_rows,  # T*P
    stride_xt,
    stride_xk,
    stride_al,
    stride_ar,
    stride_ak,
    HAS_RANKS: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    i_tile = tl.program_id(0)
    i_r = tl.program_id(1)
    i_split = tl.program_id(2)
    start = tl.load(tile_start_ptr + i_tile)
    end = tl.load(tile_end_ptr + i_tile)
    if start >= end:
        return
    adapter = tl.load(tile_adapter_ptr + i_tile).to(tl.int64)
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + adapter)
    else:
        rank = R
    r0 = i_r * BLOCK_R
    if r0 >= rank:
        return

    o_m = start + tl.arange(0, BLOCK_M)
    m_m = o_m < end
    rows = tl.load(sorted_rows_ptr + o_m, mask=m_m, other=0).to(tl.int64)
    tokens = rows // P
    o_r = r0 + tl.arange(0, BLOCK_R)
    m_r = o_r < rank
    p_x = x_ptr + tokens[:, None] * stride_xt
    p_a = a_ptr + adapter * stride_al + o_r[None, :] * stride_ar

    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = i_split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    b_acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < k_hi
        b_x = tl.load(p_x + o_k[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_a = tl.load(p_a + o_k[:, None] * stride_ak, mask=m_k[:, None] & m_r[None, :], other=0.0)
        b_acc = dot_acc(b_acc, b_x, b_a, IEEE)

    b_w = tl.load(row_weight_ptr + rows, mask=m_m, other=0.0)
    if HAS_SCALES:
        b_w = b_w * tl.load(scales_ptr + adapter)
    b_acc = b_acc * b_w[:, None]
    p_v = v_ptr + i_split.to(tl.int64) * num_rows * R + rows[:, None] * R + o_r[None, :]
    # Every split stores, even one whose K range is empty: the expand kernel sums all splits.
    tl.store(p_v, b_acc, mask=m_m[:, None] & m_r[None, :])


def lora_shrink_launch(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [L, R, K]
    v: torch.Tensor,  # [SPLIT_K, T*P, R] fp32, written
    sorted_rows: torch.Tensor,  # [T*P] int32
    tile_adapter: torch.Tensor,  # [n_tiles] int32
    tile_start: torch.Tensor,  # [n_tiles] int32
    tile_end: torch.Tensor,  # [n_tiles] int32
    row_weight: torch.Tensor,  # [T*P] fp32
    ranks: torch.Tensor | None,  # [L] int32
    scales: torch.Tensor | None,  # [L] fp32
    num_slots: int,
    block_m: int,
    config: dict,
) -> None:
    """Launch the shrink kernel over a plan's shrink tiles (see the module docstring)."""
    n_tiles = tile_adapter.shape[0]
    _, R, K = lora_a.shape
    assert v.shape[0] == config["SPLIT_K"] and v.dtype == torch.float32
    if n_tiles == 0 or R == 0:
        return
    grid = (n_tiles, triton.cdiv(R, config["BLOCK_R"]), config["SPLIT_K"])
    _lora_shrink_kernel[grid](
        x,
        lora_a,
        v,
        sorted_rows,
        tile_adapter,
        tile_start,
        tile_end,
        row_weight,
        ranks if ranks is not None else tile_start,  # any pointer: never read without HAS_RANKS
        scales if scales is not None else row_weight,
        K,
        R,
        num_slots,
        v.shape[1],
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        HAS_RANKS=ranks is not None,
        HAS_SCALES=scales is not None,
        IEEE=x.dtype == torch.float32 or x.dtype == torch.float64,
        BLOCK_M=block_m,
        BLOCK_R=config["BLOCK_R"],
        BLOCK_K=config["BLOCK_K"],
        SPLIT_K=config["SPLIT_K"],
        num_warps=config["num_warps"],
    )
