"""Shrink: ``v[split, t*P + p, :r_i] = w[t, p] * s_i * x[t, Ksplit] @ A_i[:r_i, Ksplit]^T``.

One program per (shrink tile, rank chunk, K split); a tile is rows of one adapter (at decode all its
rows). It walks its rows in ``BLOCK_M`` sub-blocks, gathering them from x by token. The K splits
store their partials side by side; the expand sums them in a fixed order. See docs/kernels.md.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_acc


# num_rows varies with the batch: not specialised (no new compile when it becomes 1 or a multiple of 16).
@triton.jit(do_not_specialize=["P", "num_rows"])
def _lora_shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [L, R, K]
    v_ptr,  # [SPLIT_K, T*P, R] fp32 out, contiguous
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

    o_r = r0 + tl.arange(0, BLOCK_R)
    m_r = o_r < rank
    p_a = a_ptr + adapter * stride_al + o_r[None, :] * stride_ar
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = i_split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if HAS_SCALES:
        scale = tl.load(scales_ptr + adapter)
    else:
        scale = 1.0
    # int64 before the product: SPLIT_K * T * P * R can pass 2^31 at prefill.
    p_v_split = v_ptr + i_split.to(tl.int64) * num_rows * R
    for m0 in range(start, end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < end
        rows = tl.load(sorted_rows_ptr + o_m, mask=m_m, other=0).to(tl.int64)
        p_x = x_ptr + (rows // P)[:, None] * stride_xt
        b_acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < k_hi
            b_x = tl.load(p_x + o_k[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)
            b_a = tl.load(p_a + o_k[:, None] * stride_ak, mask=m_k[:, None] & m_r[None, :], other=0.0)
            b_acc = dot_acc(b_acc, b_x, b_a, IEEE)
        b_w = tl.load(row_weight_ptr + rows, mask=m_m, other=0.0) * scale
        p_v = p_v_split + rows[:, None] * R + o_r[None, :]
        # Every split stores, even one whose K range is empty: the expand sums all splits.
        tl.store(p_v, b_acc * b_w[:, None], mask=m_m[:, None] & m_r[None, :])


def lora_shrink_args(
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [L, R, K]
    v: torch.Tensor,  # [SPLIT_K, T*P, R] fp32, contiguous
    sorted_rows: torch.Tensor,  # [T*P] int32
    tile_adapter: torch.Tensor,  # [n_tiles] int32
    tile_start: torch.Tensor,  # [n_tiles] int32
    tile_end: torch.Tensor,  # [n_tiles] int32
    row_weight: torch.Tensor,  # [T*P] fp32
    ranks: torch.Tensor | None,  # [L] int32
    scales: torch.Tensor | None,  # [L] fp32
    num_slots: int,
    config: dict,
) -> tuple[tuple[int, int, int], list, dict]:
    """(grid, positional args, constexprs and num_warps) of one shrink launch; compile-check uses it too."""
    _, R, K = lora_a.shape
    assert v.shape[0] == config["SPLIT_K"] and v.dtype == torch.float32, "v must be [SPLIT_K, T*P, R] fp32"
    for name, t in (("v", v), ("sorted_rows", sorted_rows), ("row_weight", row_weight)):
        assert t.is_contiguous(), f"shrink: {name} must be contiguous (indexed as a flat array)"
    for name, t in (("tile_adapter", tile_adapter), ("tile_start", tile_start), ("tile_end", tile_end)):
        assert t.is_contiguous() and t.dtype == torch.int32, f"shrink: {name} must be contiguous int32"
    grid = (tile_adapter.shape[0], triton.cdiv(R, config["BLOCK_R"]), config["SPLIT_K"])
    args = [
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
    ]
    meta = {
        "HAS_RANKS": ranks is not None,
        "HAS_SCALES": scales is not None,
        "IEEE": x.dtype in (torch.float32, torch.float64),
        "BLOCK_M": config["BLOCK_M"],
        "BLOCK_R": config["BLOCK_R"],
        "BLOCK_K": config["BLOCK_K"],
        "SPLIT_K": config["SPLIT_K"],
        "num_warps": config["num_warps"],
    }
    return grid, args, meta


def lora_shrink_launch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    v: torch.Tensor,
    sorted_rows: torch.Tensor,
    tile_adapter: torch.Tensor,
    tile_start: torch.Tensor,
    tile_end: torch.Tensor,
    row_weight: torch.Tensor,
    ranks: torch.Tensor | None,
    scales: torch.Tensor | None,
    num_slots: int,
    block_m: int,
    config: dict,
) -> None:
    """Launch the shrink over a plan's shrink tiles (arguments as in :func:`lora_shrink_args`).

    ``block_m`` is the plan's rows per tile (``plan.shrink_block_m``); the kernel walks each tile in
    ``config["BLOCK_M"]`` sub-blocks, so the two need not match.
    """
    if tile_adapter.shape[0] == 0 or lora_a.shape[1] == 0 or block_m <= 0:
        return
    grid, args, meta = lora_shrink_args(
        x,
        lora_a,
        v,
        sorted_rows,
        tile_adapter,
        tile_start,
        tile_end,
        row_weight,
        ranks,
        scales,
        num_slots,
        config,
    )
    _lora_shrink_kernel[grid](*args, **meta)
