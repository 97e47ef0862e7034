"""PyTorch implementations of the fused multi-LoRA delta.

- :func:`fused_lora_torch`: the PyTorch backend (CPU default), no loop over sequences or tokens.
  Padded batches (every sequence the same length, as a model's ``[B, S, H]`` input) gather each
  sequence's adapters and run two batched matmuls; otherwise it walks the plan's groups: one shrink
  and one expand matmul per distinct adapter, on slices where an adapter's rows are consecutive.
- :func:`fused_lora_reference`: the oracle the tests run in float64, written as plainly as the math.

Semantics (both)::

    for s in range(S):
        for p in range(P):
            i = adapter_ids[s, p]
            if i < 0: continue
            r = ranks[i]
            t = slice(seq_offsets[s], seq_offsets[s + 1])
            y[t] += adapter_weights[s, p] * scales[i] * (x[t] @ lora_a[i, :r].T) @ lora_b[i, :, :r].T
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .plan import LoRAPlan

__all__ = ["fused_lora_torch", "fused_lora_reference"]


# Which method a padded batch (every sequence the same length) takes, from bench/bench_torch_path.py on
# 2 CPU cores: seq_bmm gathers S * P copies of adapter weights, then runs two bmm calls; grouped reads
# each distinct adapter once but pays two matmuls (plus a gather and a scatter) per adapter. The gather
# is cheap next to the matmuls from 4 tokens per sequence, or when there are at most 32 (sequence,
# slot) pairs to gather for and no slot needs masking; decode over many sequences (32 x 3 slots), or
# with empty slots or ranks short of R (zeroing the gathered weights costs two more passes), is faster
# grouped (bench/bench_generation.py).
SEQ_BMM_MIN_TOKENS = 4
SEQ_BMM_MAX_PAIRS = 32
# Before both: a small batch (decode) runs "dense", every rank unit of every adapter in the batch on
# every token with a zero coefficient where a token did not select it: ~8 tensor ops whatever the
# number of adapters, where grouped pays ~5 per adapter. The extra arithmetic is T * (sum of the used
# ranks) multiply-adds per K and N; up to this many it costs less than the saved ops
# (`dlplora bench --device cpu`: S=64 decode, 8 adapters of rank 16, dense 0.15 ms vs grouped 0.7 ms;
# 512 tokens, seq_bmm 0.24 ms vs dense 0.71 ms).
DENSE_MAX_TOKEN_RANKS = 16384


def fused_lora_torch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    out: torch.Tensor,
    ranks: torch.Tensor | Sequence[int] | None = None,
    scales: torch.Tensor | Sequence[float] | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """Add the fused LoRA delta of ``plan`` into ``out`` ``[T, N]`` in place (the PyTorch backend).

    ``ranks`` / ``scales``: length-``L`` tensors or host sequences, or None (full rank, scale 1).
    ``method``: ``"grouped"`` (two matmuls per distinct adapter), ``"seq_bmm"`` (two batched matmuls
    over the sequences of a padded batch), ``"dense"`` (every used rank unit on every token, masked by
    coefficients) or ``"auto"``: dense while both tokens x R and tokens x the used adapters' summed
    ranks are <= ``DENSE_MAX_TOKEN_RANKS``, then
    seq_bmm for padded batches of at least ``SEQ_BMM_MIN_TOKENS`` tokens per sequence or at most
    ``SEQ_BMM_MAX_PAIRS`` unmasked sequence-slot pairs, grouped otherwise.
    """
    if method == "dense" or (method == "auto" and plan.num_tokens * lora_a.shape[1] <= DENSE_MAX_TOKEN_RANKS):
        # T * R first: it needs no host work, and keeps the per-layer cost of prefill batches at zero.
        rank_list, used = _host_ranks(ranks, plan.num_adapters, lora_a.shape[1]), plan.used_adapters()
        if method == "dense" or plan.num_tokens * sum(rank_list[a] for a in used) <= DENSE_MAX_TOKEN_RANKS:
            return _dense(
                x, lora_a, lora_b, plan, out, scales, *_dense_rank_rows(plan, rank_list, lora_a.shape[1])
            )
    keep = None
    if method in ("auto", "seq_bmm") and plan.uniform_seq_len() > 0:
        keep = _slot_rank_mask(plan, ranks, lora_a.shape[1])
    if method == "auto":
        seq_len = plan.uniform_seq_len()
        few_unmasked_pairs = plan.seq_adapter.numel() <= SEQ_BMM_MAX_PAIRS and keep is None
        method = (
            "seq_bmm" if seq_len >= SEQ_BMM_MIN_TOKENS or (seq_len > 0 and few_unmasked_pairs) else "grouped"
        )
    if method == "seq_bmm":
        return _seq_bmm(x, lora_a, lora_b, plan, out, scales, keep)
    if method != "grouped":
        raise ValueError(f"method must be 'auto', 'grouped', 'seq_bmm' or 'dense', got {method!r}")
    ranks = ranks.tolist() if isinstance(ranks, torch.Tensor) else ranks
    scales = scales.tolist() if isinstance(scales, torch.Tensor) else scales
    for group in plan.host_groups():
        a = group.adapter
        r = lora_a.shape[1] if ranks is None else int(ranks[a])
        if r == 0:
            continue
        weights = group.weights.to(x.dtype)
        if scales is not None:
            weights = weights * scales[a]
        shrink_w = lora_a[a, :r].t()
        expand_w = lora_b[a, :, :r].t()
        if group.contiguous:
            v = torch.mm(x[group.start : group.stop], shrink_w).mul_(weights)
            out[group.start : group.stop].addmm_(v, expand_w)
        else:
            v = torch.mm(x.index_select(0, group.tokens), shrink_w).mul_(weights)
            out.index_add_(0, group.tokens, torch.mm(v, expand_w))
    return out


def _host_ranks(ranks, L: int, R: int) -> list[int]:
    return [R] * L if ranks is None else torch.as_tensor(ranks).tolist()


def _dense_rank_rows(
    plan: LoRAPlan, rank_list: list[int], R: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Rows of the flattened ``[L*R]`` stack in use (adapters of the batch, units below their rank;
    None: all of them) and the adapter of each row. Host work, memoised in the plan per rank pattern,
    so the layers of one forward pass that share ranks pay it once."""
    key = ("dense_rows", R, tuple(rank_list))
    if key not in plan.memo:
        used = plan.used_adapters()
        rows = [a * R + j for a in used for j in range(rank_list[a])]
        row_adapter = torch.tensor(
            [a for a in used for _ in range(rank_list[a])], dtype=torch.long, device=plan.device
        )
        every_row = len(rows) == plan.num_adapters * R
        plan.memo[key] = (
            None if every_row else torch.tensor(rows, dtype=torch.long, device=plan.device),
            row_adapter,
        )
    return plan.memo[key]


def _token_coefficients(plan: LoRAPlan) -> torch.Tensor:
    """``[T, L]`` float32: the summed fusion weight of each adapter for each token (memoised in the plan)."""
    if "coef" not in plan.memo:
        ids = plan.token_adapter.long()
        L = plan.num_adapters
        coef = torch.zeros(plan.num_tokens, L + 1, device=plan.device, dtype=torch.float32)
        coef.scatter_add_(1, torch.where(ids >= 0, ids, L), plan.token_weight)  # empty slots land in column L
        plan.memo["coef"] = coef[:, :L]
    return plan.memo["coef"]


def _dense(
    x, lora_a, lora_b, plan: LoRAPlan, out, scales, rows: torch.Tensor | None, row_adapter: torch.Tensor
) -> torch.Tensor:
    """Small batches: ``out += ((x @ A_rows^T) * coef) @ B_rows`` over the used rank rows of all adapters."""
    if row_adapter.numel() == 0:
        return out
    L, R, K = lora_a.shape
    N = lora_b.shape[1]
    # Only rows below each rank are read, so whatever lies beyond a rank never enters the sums.
    a_rows = lora_a.reshape(L * R, K)
    b_rows = lora_b.transpose(1, 2).reshape(L * R, N)  # a view when B is stored [L, R, N], as the layers do
    if rows is not None:
        a_rows, b_rows = a_rows.index_select(0, rows), b_rows.index_select(0, rows)
    coef = _token_coefficients(plan).index_select(1, row_adapter).to(x.dtype)  # [T, n]
    if scales is not None:
        coef = coef * torch.as_tensor(scales, device=x.device, dtype=x.dtype).index_select(0, row_adapter)
    out.addmm_(torch.mm(x, a_rows.t()).mul_(coef), b_rows)
    return out


def _slot_rank_mask(plan: LoRAPlan, ranks, R: int) -> torch.Tensor | None:
    """``[S*P, R]`` bool: rank units in use per (sequence, slot); None when every one is."""
    S, P = plan.seq_adapter.shape
    keep = None
    if ranks is not None:
        ranks = torch.as_tensor(ranks, device=plan.device)
        keep = (
            torch.arange(R, device=plan.device)
            < ranks.index_select(0, plan.seq_adapter.clamp(min=0).reshape(-1))[:, None]
        )
    if plan.has_empty_slots():
        in_use = (plan.seq_adapter >= 0).reshape(-1, 1)
        keep = in_use.expand(S * P, R) if keep is None else keep & in_use
    return None if keep is None or bool(keep.all()) else keep


def _seq_bmm(x, lora_a, lora_b, plan: LoRAPlan, out, scales, keep: torch.Tensor | None) -> torch.Tensor:
    """Padded batch: gather each sequence's P adapters as one rank-P*R LoRA, then two bmm calls.

    ``keep``: the :func:`_slot_rank_mask` of this call (None: nothing to mask).
    """
    S, P = plan.seq_adapter.shape
    seq_len = plan.uniform_seq_len()
    if seq_len == 0:
        raise ValueError("method='seq_bmm' needs sequences of one common, non-zero length")
    _, R, K = lora_a.shape
    N = lora_b.shape[1]
    flat_ids = plan.seq_adapter.clamp(min=0).reshape(-1)
    # index_select on the [L, R, N] view: a contiguous gather when B is stored that way (the layers do).
    a_sel = lora_a.index_select(0, flat_ids)  # [S*P, R, K]
    b_sel = lora_b.transpose(1, 2).index_select(0, flat_ids)  # [S*P, R, N]
    coef = plan.seq_weight.to(x.dtype).reshape(-1)
    if scales is not None:
        coef = coef * torch.as_tensor(scales, device=x.device, dtype=x.dtype).index_select(0, flat_ids)
    if keep is not None:
        # Zero (not just skip) what lies beyond a rank or in an empty slot: it may hold anything, NaN included.
        a_sel.masked_fill_(~keep[:, :, None], 0)
        b_sel.masked_fill_(~keep[:, :, None], 0)
    v = torch.bmm(x.view(S, seq_len, K), a_sel.view(S, P * R, K).transpose(1, 2))  # [S, len, P*R]
    v.mul_(coef.repeat_interleave(R).view(S, 1, P * R))
    out.view(S, seq_len, N).baddbmm_(v, b_sel.view(S, P * R, N))
    return out


def fused_lora_reference(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seq_offsets: torch.Tensor,
    adapter_ids: torch.Tensor,
    adapter_weights: torch.Tensor,
    ranks: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA delta ``[T, N]`` by the definition (a loop over sequences and slots); the tests' oracle."""
    T, N = x.shape[0], lora_b.shape[1]
    y = torch.zeros(T, N, dtype=x.dtype, device=x.device)
    for s in range(adapter_ids.shape[0]):
        t = slice(int(seq_offsets[s]), int(seq_offsets[s + 1]))
        for p in range(adapter_ids.shape[1]):
            i = int(adapter_ids[s, p])
            if i < 0:
                continue
            r = lora_a.shape[1] if ranks is None else int(ranks[i])
            scale = 1.0 if scales is None else float(scales[i])
            weight = float(adapter_weights[s, p]) * scale
            y[t] += weight * (x[t] @ lora_a[i, :r].T) @ lora_b[i, :, :r].T
    return y
