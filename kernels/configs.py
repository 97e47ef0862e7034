"""Block shapes of the shrink and expand kernels, chosen from the shapes of one call.

One function per kernel, no autotuning: autotune costs a compile sweep on the first call and cannot
run inside CUDA-graph capture. Each choice takes few values, so a batch that changes size during
serving rarely needs a new compile (``dlplora compile-check`` counts the variants). The rows per tile
belong to the plan (``dlplora_triton.plan.plan_block_sizes``). The reasons: docs/kernels.md.
"""

import torch

# Programs a launch should reach: 2 per SM of an H100 / H200 (132 SMs), so every SM has a second
# program to switch to while the first waits on memory.
TARGET_PROGRAMS = 264
# SPLIT_K is a power of two up to this: each split adds a [T*P, R] fp32 partial that the expand reads.
MAX_SPLIT_K = 16
_SHRINK_BLOCK_M = 64  # rows per shrink sub-block: a whole decode adapter in one pass at S <= 64


def _rank_block(max_rank: int) -> int:
    # tl.dot needs every dimension >= 16; 16 keeps the waste of a small rank low, 32 halves the
    # number of rank chunks of the usual r >= 32 adapters.
    return 16 if max_rank <= 16 else 32


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def shrink_config(num_tiles: int, K: int, max_rank: int, dtype: torch.dtype) -> dict:
    """Shrink: BLOCK_M (row sub-block), BLOCK_R (rank chunk), BLOCK_K, SPLIT_K, num_warps.

    ``num_tiles`` is the plan's static tile count (``plan.shrink_tile_start.numel()``). K is split
    into the fewest power-of-two parts that bring the grid to TARGET_PROGRAMS, at most MAX_SPLIT_K
    and at most one part per two K blocks.
    """
    block_r = _rank_block(max_rank)
    block_k = 64 if dtype == torch.float32 else 128
    rank_chunks = -(-max_rank // block_r) if max_rank > 0 else 1
    k_blocks = -(-K // block_k)
    want = _pow2_at_least(-(-TARGET_PROGRAMS // max(1, num_tiles * rank_chunks)))
    cap = min(MAX_SPLIT_K, 1 << max(0, (k_blocks // 2).bit_length() - 1))  # a power of two <= k_blocks / 2
    return {
        "BLOCK_M": _SHRINK_BLOCK_M,
        "BLOCK_R": block_r,
        "BLOCK_K": block_k,
        "SPLIT_K": min(want, cap),
        "num_warps": 4,
    }


def expand_config(num_token_blocks: int, N: int, max_rank: int, dtype: torch.dtype) -> dict:
    """Expand: BLOCK_N, BLOCK_R, num_warps.

    The widest N block (128, 64, 32 or 16) whose grid reaches TARGET_PROGRAMS: few token blocks
    (decode) get narrow blocks so the grid fills the GPU, prefill gets wide ones, where each B tile
    is reused by many tokens. 16 is the narrowest a tensor-core dot takes.
    """
    block_n = 16
    for candidate in (128, 64, 32):
        if num_token_blocks * -(-N // candidate) >= TARGET_PROGRAMS:
            block_n = candidate
            break
    # 8 warps for the widest tile: a 64 x 128 fp32 accumulator in 4 warps leaves no registers to spare.
    return {"BLOCK_N": block_n, "BLOCK_R": _rank_block(max_rank), "num_warps": 8 if block_n == 128 else 4}
