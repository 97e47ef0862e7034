"""Block shapes of the shrink and expand kernels, chosen from the shapes of one call.

One function per kernel, no autotuning: autotune costs a compile sweep on the first call and cannot
run inside CUDA-graph capture. The row block (BLOCK_M) belongs to the plan (see
``dlplora_triton.plan.plan_block_sizes``), since the plan's tiles are cut to it.
"""

import torch

# Programs the shrink grid should reach before splitting K: a few per SM of a large GPU (H100: 132).
_SHRINK_TARGET_PROGRAMS = 512


def _rank_block(max_rank: int) -> int:
    # tl.dot needs every dimension >= 16; 16 keeps the waste of a small rank low, 32 halves the
    # number of rank chunks of the usual r >= 32 adapters.
    return 16 if max_rank <= 16 else 32


def shrink_config(num_tiles: int, K: int, max_rank: int, dtype: torch.dtype) -> dict:
    """Shrink: BLOCK_R (rank chunk), BLOCK_K, SPLIT_K, num_warps.

    Decode has only a few tiles (one per distinct adapter), too few programs to pull HBM bandwidth
    through a long K loop, so K is split across programs; each split writes its own partial slice
    and the expand kernel sums them in a fixed order (deterministic, no atomics).
    """
    block_r = _rank_block(max_rank)
    block_k = 64 if dtype == torch.float32 else 128
    rank_chunks = -(-max_rank // block_r)
    k_blocks = -(-K // block_k)
    split_k = max(1, min(k_blocks // 4, _SHRINK_TARGET_PROGRAMS // max(1, num_tiles * rank_chunks), 16))
    return {"BLOCK_R": block_r, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": 4}


def expand_config(num_token_blocks: int, N: int, max_rank: int, dtype: torch.dtype) -> dict:
    """Expand: BLOCK_N, BLOCK_R, num_warps.

    Narrow N blocks when there are few token blocks (decode) so the grid still fills the GPU; wide
    blocks for prefill, where each program's B tile is reused by many tokens.
    """
    block_n = 64 if num_token_blocks <= 4 else 128
    return {"BLOCK_N": block_n, "BLOCK_R": _rank_block(max_rank), "num_warps": 4}
