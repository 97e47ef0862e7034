"""The per-forward routing plan: (token, slot) rows grouped by adapter, built once and shared by layers.

Every adapted layer of a model applies the same routing in one forward pass, so the grouping work
(sort by adapter, tile lists, per-tile adapter sets) is done once here and handed to each layer's
kernel call. Everything is built with device tensor ops of static shape and no host sync, so a plan
built on CUDA can be captured in a CUDA graph (pass ``num_tokens`` to avoid the one read of
``seq_offsets[-1]``).

Worked example: ``L = 3`` adapters, two sequences of 2 and 3 tokens, ``P = 2`` slots::

    seq_offsets     = [0, 2, 5]
    adapter_ids     = [[2, -1], [0, 2]]          weights [[1.0, 0.0], [0.7, 0.3]]
    token_adapter   = [[2,-1], [2,-1], [0,2], [0,2], [0,2]]      # [T, P], row t*P + p
    sorted_rows     = [4, 6, 8,  0, 2, 5, 7, 9,  1, 3]           # adapter 0 | adapter 2 | empty slots
    shrink tiles (block 4): (adapter 0, rows 0:3), (adapter 2, rows 3:7), (adapter 2, rows 7:8), ...
    expand tiles (block 4): tokens 0:4 -> adapters [2, 0]; tokens 4:5 -> adapters [0, 2]

The shrink kernel runs one program per shrink tile (one adapter, up to ``shrink_block_m`` rows from any
sequence), so each adapter's A is read once per tile. The expand kernel runs one program per block of
consecutive tokens and loops over the distinct adapters of that block, so B is read once per block
and the sum over a token's slots happens in registers before the single write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LoRAPlan", "build_plan", "plan_block_sizes"]


def plan_block_sizes(num_tokens: int, num_slots: int) -> tuple[int, int]:
    """Row-block sizes (shrink, expand) of a plan, chosen by the batch shape.

    Decode (a few tokens) takes the smallest block the tensor-core dot accepts (16), so a tile holds
    only rows that exist; prefill takes 64 rows, where one adapter tile is reused by many tokens.
    """
    rows = num_tokens * num_slots
    shrink = 16 if rows <= 16 else 32 if rows <= 256 else 64
    expand = 16 if num_tokens <= 16 else 32 if num_tokens <= 32 else 64
    return shrink, expand


@dataclass(frozen=True)
class HostGroup:
    """Rows of one adapter for the PyTorch path: token indices (or a contiguous range) and weights."""

    adapter: int
    tokens: torch.Tensor  # [n] int64 token index of each row
    weights: torch.Tensor  # [n, 1] fusion weight of each row (float32)
    start: int  # when contiguous: rows are exactly tokens start:stop, in order
    stop: int
    contiguous: bool


@dataclass(frozen=True)
class LoRAPlan:
    """Routing of one batch, grouped by adapter (see the module docstring for a worked example).

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
    # Host-side data the PyTorch path derives from the plan (one sync each), built once per plan and
    # shared by every layer of the forward pass; a new plan starts empty.
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.token_adapter.device

    @property
    def nbytes(self) -> int:
        """Device bytes held by the plan's tensors."""
        return sum(v.numel() * v.element_size() for v in vars(self).values() if isinstance(v, torch.Tensor))

    def uniform_seq_len(self) -> int:
        """Tokens per sequence when every sequence has the same length (a padded batch), else 0.

        Read on the host once (one sync) and memoised in the plan; the PyTorch path uses it.
        """
        if "seq_len" not in self.memo:
            lengths = self.seq_offsets.diff()
            uniform = lengths.numel() > 0 and bool((lengths == lengths[0]).all())
            self.memo["seq_len"] = int(lengths[0]) if uniform else 0
        return self.memo["seq_len"]

    def used_adapters(self) -> list[int]:
        """Adapters selected by at least one token (one host sync, memoised in the plan)."""
        if "used" not in self.memo:
            self.memo["used"] = [a for a, count in enumerate(self.row_counts.tolist()) if count > 0]
        return self.memo["used"]

    def has_empty_slots(self) -> bool:
        """Whether any sequence has a ``-1`` slot (one host sync, memoised in the plan)."""
        if "empty" not in self.memo:
            self.memo["empty"] = bool((self.seq_adapter < 0).any())
        return self.memo["empty"]

    def host_groups(self) -> list[HostGroup]:
        """Rows per adapter on the host, for the PyTorch path (one host sync, memoised in the plan)."""
        if "groups" in self.memo:
            return self.memo["groups"]
        groups = self.memo["groups"] = []
        if self.num_tokens * self.num_slots > 0:
            counts = self.row_counts.tolist()
            rows = self.sorted_rows.long()
            weights = self.token_weight.reshape(-1)
            start = 0
            for adapter, count in enumerate(counts):
                if count == 0:
                    continue
                adapter_rows = rows[start : start + count]
                start += count
                tokens = adapter_rows // self.num_slots
                first, last = int(tokens[0]), int(tokens[-1])
                # Rows are sorted by (adapter, token, slot), so tokens are non-decreasing: the group
                # is a plain slice exactly when it has one row per token of [first, last] (an id
                # repeated in a row gives a token two rows, which the slice would add only once).
                contiguous = last - first + 1 == count and bool((tokens.diff() > 0).all())
                groups.append(
                    HostGroup(
                        adapter, tokens, weights[adapter_rows].unsqueeze(1), first, last + 1, contiguous
                    )
                )
        return groups


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
    )
