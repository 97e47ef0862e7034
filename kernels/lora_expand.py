"""Expand: ``out[t] += sum_p sum_split v[split, t*P + p, :r_i] @ B_i[:, :r_i]^T``, written once.

One program per (block of consecutive tokens, block of N). It loads its tokens' slot ids once, then
for each distinct adapter of its token block (listed by the plan) loads that adapter's B tile once
and multiplies it by the slots that chose it. Slots and K splits are summed in registers in a fixed
order and each output element has one writer: no atomics, bitwise reproducible. See docs/kernels.md.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_acc


# T, P, W and SPLIT_K vary with the batch: not specialised, so a new batch size rarely needs a new compile.
@triton.jit(do_not_specialize=["T", "P", "W", "SPLIT_K"])
def _lora_expand_kernel(
    v_ptr,  # [SPLIT_K, T*P, R] fp32, contiguous
    b_ptr,  # [L, N, R], any strides
    out_ptr,  # [T, N], added into
    token_adapter_ptr,  # [T, P] int32, -1 = empty, contiguous
    tile_count_ptr,  # [n_blocks] int32 distinct adapters of each token block
    tile_adapters_ptr,  # [n_blocks, W] int32, contiguous
    ranks_ptr,  # [L] int32 (HAS_RANKS)
    T,
    N,
    R,
    P,
    W,
    SPLIT_K,  # K splits of the shrink, summed here in order
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
    BLOCK_P: tl.constexpr,
):
    # Token blocks vary fastest, so the programs that read the same B tiles run side by side.
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    n_adapters = tl.load(tile_count_ptr + i_m)
    if n_adapters == 0:
        return
    o_t = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_t = o_t < T
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_p = tl.arange(0, BLOCK_P)
    # Slot ids of the block's tokens, loaded once: [BLOCK_M, BLOCK_P], -1 where there is no slot.
    o_row = o_t[:, None] * P + o_p[None, :]
    m_row = m_t[:, None] & (o_p[None, :] < P)
    b_ids = tl.load(token_adapter_ptr + o_row, mask=m_row, other=-1)
    split_stride = T.to(tl.int64) * P * R  # int64: SPLIT_K * T * P * R can pass 2^31

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, n_adapters):
        adapter = tl.load(tile_adapters_ptr + i_m * W + i)
        if HAS_RANKS:
            rank = tl.load(ranks_ptr + adapter)
        else:
            rank = R
        m_slot = b_ids == adapter  # [BLOCK_M, BLOCK_P]: the slots that chose this adapter
        p_b = b_ptr + adapter.to(tl.int64) * stride_bl + o_n[None, :] * stride_bn
        for r0 in range(0, rank, BLOCK_R):
            o_r = r0 + tl.arange(0, BLOCK_R)
            m_r = o_r < rank
            p_v = v_ptr + o_row[:, :, None] * R + o_r[None, None, :]  # [BLOCK_M, BLOCK_P, BLOCK_R]
            m_v = m_slot[:, :, None] & m_r[None, None, :]
            b_v3 = tl.zeros([BLOCK_M, BLOCK_P, BLOCK_R], dtype=tl.float32)
            for s in range(0, SPLIT_K):
                b_v3 += tl.load(p_v + s * split_stride, mask=m_v, other=0.0)
            b_v = tl.sum(b_v3, axis=1)
            b_b = tl.load(p_b + o_r[:, None] * stride_br, mask=m_r[:, None] & m_n[None, :], other=0.0)
            b_acc = dot_acc(b_acc, b_v.to(b_b.dtype), b_b, IEEE)

    p_out = out_ptr + o_t[:, None] * stride_ot + o_n[None, :] * stride_on
    m_out = m_t[:, None] & m_n[None, :]
    b_out = tl.load(p_out, mask=m_out, other=0.0).to(tl.float32) + b_acc
    tl.store(p_out, b_out.to(out_ptr.dtype.element_ty), mask=m_out)


def lora_expand_args(
    v: torch.Tensor,  # [SPLIT_K, T*P, R] fp32 from the shrink, contiguous
    lora_b: torch.Tensor,  # [L, N, R], any strides (the layers store a transposed view)
    out: torch.Tensor,  # [T, N], added into in place
    token_adapter: torch.Tensor,  # [T, P] int32, contiguous
    tile_count: torch.Tensor,  # [n_blocks] int32
    tile_adapters: torch.Tensor,  # [n_blocks, W] int32, contiguous
    ranks: torch.Tensor | None,  # [L] int32
    block_m: int,
    config: dict,
) -> tuple[tuple[int, int], list, dict]:
    """(grid, positional args, constexprs and num_warps) of one expand launch; compile-check uses it too."""
    T, N = out.shape
    _, _, R = lora_b.shape
    P = token_adapter.shape[1]
    assert v.dtype == torch.float32 and v.is_contiguous(), "expand: v must be contiguous fp32"
    assert v.shape[1:] == (T * P, R), f"expand: v must be [SPLIT_K, T*P, R], got {list(v.shape)}"
    for name, t in (
        ("token_adapter", token_adapter),
        ("tile_count", tile_count),
        ("tile_adapters", tile_adapters),
    ):
        assert t.is_contiguous() and t.dtype == torch.int32, f"expand: {name} must be contiguous int32"
    grid = (tile_count.shape[0], triton.cdiv(N, config["BLOCK_N"]))
    args = [
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
        P,
        tile_adapters.shape[1],
        v.shape[0],
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        out.stride(0),
        out.stride(1),
    ]
    meta = {
        "HAS_RANKS": ranks is not None,
        "IEEE": lora_b.dtype in (torch.float32, torch.float64),
        "BLOCK_M": block_m,
        "BLOCK_N": config["BLOCK_N"],
        "BLOCK_R": config["BLOCK_R"],
        "BLOCK_P": slot_block(P),
        "num_warps": config["num_warps"],
    }
    return grid, args, meta


def slot_block(num_slots: int) -> int:
    """Slots a program holds at once: 4 up to P = 4 (one compiled variant for P = 1..4), else P's next power of 2."""
    return max(4, triton.next_power_of_2(max(1, num_slots)))


def lora_expand_launch(
    v: torch.Tensor,
    lora_b: torch.Tensor,
    out: torch.Tensor,
    token_adapter: torch.Tensor,
    tile_count: torch.Tensor,
    tile_adapters: torch.Tensor,
    ranks: torch.Tensor | None,
    block_m: int,
    config: dict,
) -> None:
    """Launch the expand over a plan's token blocks (arguments as in :func:`lora_expand_args`)."""
    T, N = out.shape
    if tile_count.shape[0] == 0 or N == 0 or lora_b.shape[2] == 0 or token_adapter.shape[1] == 0:
        return
    grid, args, meta = lora_expand_args(
        v, lora_b, out, token_adapter, tile_count, tile_adapters, ranks, block_m, config
    )
    _lora_expand_kernel[grid](*args, **meta)
