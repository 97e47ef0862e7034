"""The per-forward plan: (token, slot) rows grouped by adapter, built once and shared by layers.

Device tensors of static shape only, built without a host sync; ``docs/plan.md`` has a worked
example and what each field is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LoRAPlan", "build_plan", "plan_block_sizes"]


def plan_block_sizes(num_tokens: int, num_slots: int) -> tuple[int, int]:
    """(rows per shrink tile, tokens per expand block) of a plan, chosen by the batch shape.

    Decode (T <= 256): one shrink tile holds all of an adapter's rows, so each adapter's A is
    fetched once per launch; expand blocks of 16 tokens (the smallest tensor-core dot) give the
    grid its programs. Prefill: 64 rows / tokens, each weight tile reused by many rows.
    Reasons and byte counts: docs/kernels.md.
    """
    rows = num_tokens * num_slots
    if num_tokens <= 256:
        return max(16, rows), 16
    return 64, 64


@dataclass(frozen=True)
class LoRAPlan:
    """One batch's selection, grouped by adapter (``docs/plan.md`` has a worked example).

    Build it with :func:`build_plan`; pass it to :func:`dlplora_triton.fused_lora_planned` of every
    layer in the forward pass. Fields are device tensors plus the static sizes they were built for.
    """

    num_tokens: int  # T
    num_slots: int  # P
    num_adapters: int  # L
    token_adapter: torch.Tensor  # [T, P] int32, -1 = empty slot
    token_weight: torch.Tensor  # [T, P] float32, 0 in empty slots
    sorted_rows: torch.Tensor  # [T*P] int32 row index t*P+p, grouped by adapter, empty slots last
    row_counts: torch.Tensor  # [L] int32 rows (token, slot) per adapter
    shrink_block_m: int
    shrink_tile_adapter: torch.Tensor  # [n_shrink] int32
    shrink_tile_start: torch.Tensor  # [n_shrink] int32 first index into sorted_rows
    shrink_tile_end: torch.Tensor  # [n_shrink] int32 (start == end: no work)
    expand_block_m: int
    expand_tile_count: torch.Tensor  # [ceil(T / expand_block_m)] int32 distinct adapters per token block
    expand_tile_adapters: torch.Tensor  # [ceil(T / expand_block_m), W] int32, first count entries valid
    seq_offsets: torch.Tensor  # [S+1] as given
    seq_adapter: torch.Tensor  # [S, P] int64, -1 = empty slot
    seq_weight: torch.Tensor  # [S, P] float32, 0 in empty slots
    token_seq: torch.Tensor  # [T] int32 sequence of each token

    @property
    def device(self) -> torch.device:
        return self.token_adapter.device

    @property
    def nbytes(self) -> int:
        """Device bytes held by the plan's tensors."""
        return sum(v.numel() * v.element_size() for v in vars(self).values() if isinstance(v, torch.Tensor))


def build_plan(
    seq_offsets: torch.Tensor,
    adapter_ids: torch.Tensor,
    adapter_weights: torch.Tensor,
    num_adapters: int,
    num_tokens: int | None = None,
) -> LoRAPlan:
    """Group the (token, slot) rows of a batch by adapter, once per forward pass.

    Args:
        seq_offsets: ``[S+1]`` int, ``seq_offsets[0] == 0``, non-decreasing, last entry ``T``.
        adapter_ids: ``[S, P]`` int, adapter of each slot, ``-1`` = empty slot.
        adapter_weights: ``[S, P]`` float fusion weights (ignored in empty slots).
        num_adapters: ``L``, the number of stacked adapters the layers hold.
        num_tokens: ``T``; when omitted it is read from ``seq_offsets[-1]`` (one host sync).

    The inputs are trusted (no value checks, so no host sync): :func:`dlplora_triton.fused_lora`
    validates them; call :func:`dlplora_triton.ops.check_routing` yourself when they come from users.
    """
    device = adapter_ids.device
    L = int(num_adapters)
    S, P = adapter_ids.shape
    T = int(seq_offsets[-1]) if num_tokens is None else int(num_tokens)
    shrink_bm, expand_bm = plan_block_sizes(T, P)
    i32 = torch.int32

    # Token -> sequence: the sequence whose [start, end) holds the token.
    tokens = torch.arange(T, device=device, dtype=seq_offsets.dtype)
    seq_of_token = torch.searchsorted(seq_offsets[1:].contiguous(), tokens, right=True).clamp_(
        max=max(S - 1, 0)
    )
    token_adapter = adapter_ids.long()[seq_of_token] if S > 0 else torch.full((T, P), -1, device=device)
    token_weight = adapter_weights.float()[seq_of_token] if S > 0 else torch.zeros(T, P, device=device)
    token_weight = torch.where(token_adapter >= 0, token_weight, torch.zeros_like(token_weight))

    # Shrink: sort rows by adapter (empty slots get key L and sort last); stable keeps token order.
    key = torch.where(token_adapter >= 0, token_adapter, torch.full_like(token_adapter, L)).reshape(-1)
    _, sorted_rows = torch.sort(key, stable=True)
    # scatter_add, not bincount: bincount reads the maximum back to the host.
    counts = torch.zeros(L + 1, device=device, dtype=torch.long).scatter_add_(0, key, torch.ones_like(key))[
        :L
    ]
    row_end = torch.cumsum(counts, 0)
    row_start = row_end - counts
    tiles = (counts + shrink_bm - 1) // shrink_bm
    tile_end = torch.cumsum(tiles, 0)
    tile_first = tile_end - tiles
    # sum_a ceil(c_a / bm) <= floor(T*P / bm) + min(L, T*P): a static bound, so no sync for the grid.
    n_shrink = (T * P) // shrink_bm + min(L, T * P)
    j = torch.arange(n_shrink, device=device)
    tile_adapter = torch.searchsorted(tile_end, j, right=True)
    valid = tile_adapter < L
    a = tile_adapter.clamp(max=max(L - 1, 0))
    if L > 0:
        start = row_start[a] + (j - tile_first[a]) * shrink_bm
        end = torch.minimum(start + shrink_bm, row_end[a])
    else:
        start = end = torch.zeros_like(j)
    start = torch.where(valid, start, torch.zeros_like(start))
    end = torch.where(valid, end, torch.zeros_like(end))

    # Expand: for each block of consecutive tokens, the distinct adapters its rows use.
    n_expand = -(-T // expand_bm)
    width = min(L, expand_bm * P)
    presence = torch.zeros(n_expand, L + 1, device=device, dtype=i32)
    block_of_row = torch.arange(T, device=device).div(expand_bm, rounding_mode="floor").repeat_interleave(P)
    presence.index_put_((block_of_row, key), torch.ones_like(key, dtype=i32))
    presence = presence[:, :L]
    expand_count = presence.sum(1, dtype=i32)
    expand_adapters = torch.sort(presence, dim=1, descending=True, stable=True).indices[:, :width]

    return LoRAPlan(
        num_tokens=T,
        num_slots=P,
        num_adapters=L,
        token_adapter=token_adapter.to(i32).contiguous(),
        token_weight=token_weight.contiguous(),
        sorted_rows=sorted_rows.to(i32),
        row_counts=counts.to(i32),
        shrink_block_m=shrink_bm,
        shrink_tile_adapter=a.to(i32),
        shrink_tile_start=start.to(i32),
        shrink_tile_end=end.to(i32),
        expand_block_m=expand_bm,
        expand_tile_count=expand_count,
        expand_tile_adapters=expand_adapters.to(i32).contiguous(),
        seq_offsets=seq_offsets,
        seq_adapter=adapter_ids.long(),
        seq_weight=torch.where(adapter_ids >= 0, adapter_weights.float(), torch.zeros((), device=device)),
        token_seq=seq_of_token.to(i32),
    )


_TENSOR_FIELDS = (
    "token_adapter",
    "token_weight",
    "sorted_rows",
    "row_counts",
    "shrink_tile_adapter",
    "shrink_tile_start",
    "shrink_tile_end",
    "expand_tile_count",
    "expand_tile_adapters",
    "seq_offsets",
    "seq_adapter",
    "seq_weight",
    "token_seq",
)


def plan_to_args(plan: LoRAPlan) -> tuple[list[torch.Tensor], list[int]]:
    """The plan as a custom op's arguments: its tensors and its sizes ``[T, P, L, shrink_bm, expand_bm]``."""
    sizes = [plan.num_tokens, plan.num_slots, plan.num_adapters, plan.shrink_block_m, plan.expand_block_m]
    return [getattr(plan, name) for name in _TENSOR_FIELDS], sizes


def plan_from_args(tensors: list[torch.Tensor], sizes: list[int]) -> LoRAPlan:
    """Inverse of :func:`plan_to_args`."""
    fields = dict(zip(_TENSOR_FIELDS, tensors))
    T, P, L, shrink_bm, expand_bm = sizes
    return LoRAPlan(
        num_tokens=T,
        num_slots=P,
        num_adapters=L,
        shrink_block_m=shrink_bm,
        expand_block_m=expand_bm,
        **fields,
    )
