"""The PyTorch path: the fused multi-LoRA delta of a plan with plain tensor ops (the CPU backend).

Three methods (``docs/pytorch-path.md`` gives the measurements behind the choice):

- ``dense``: every used rank unit of every adapter on every token, masked by per-token coefficients;
- ``seq_bmm``: padded batches, each sequence's ``P`` adapters gathered as one rank-``P*R`` LoRA;
- ``grouped``: two matmuls per distinct adapter, on slices where its rows are consecutive.

The host-side facts a method needs (used adapters, rows per adapter, ...) cost a device read each; a
:class:`TorchPathCache` holds them for one plan so the layers of a forward pass pay them once. The
caller owns it (next to the plan it built); without one, each call starts a fresh cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..plan import LoRAPlan

__all__ = ["fused_lora_torch", "pick_method", "TorchPathCache", "HostGroup", "METHODS"]

METHODS = ("auto", "grouped", "seq_bmm", "dense")
# Thresholds of the "auto" method choice, measured by bench/bench_torch_path.py (docs/pytorch-path.md).
SEQ_BMM_MIN_TOKENS = 4
SEQ_BMM_MAX_PAIRS = 32
DENSE_MAX_TOKEN_RANKS = 16384
# Where auto would fall back to grouped (decode over many (sequence, slot) pairs), dense instead while
# its multiply-adds per adapter, T * R * (K + N), cost less than grouped's ops per adapter, up to
# T * (used ranks) of 65536 (bench/bench_many_adapters.py: 32 sequences x 3 slots over 64 adapters).
DENSE_OVER_GROUPED_MAX_ADAPTER_MACS = 2**21
DENSE_OVER_GROUPED_MAX_TOKEN_RANKS = 65536
_MAX_COEF_ENTRIES = 512  # coefficient sets a TorchPathCache keeps (per layer pattern and weights tensor)


@dataclass(frozen=True)
class HostGroup:
    """Rows of one adapter: token index of each row (or a contiguous token range) and flat row ids."""

    adapter: int
    tokens: torch.Tensor  # [n] int64 token index of each row
    rows: torch.Tensor  # [n] int64 row index t*P + p (into the plan's [T*P] token weights)
    start: int  # when contiguous: the rows are exactly tokens start:stop, in order
    stop: int
    contiguous: bool


@dataclass
class TorchPathCache:
    """Host-side data the PyTorch path derives from ``plan`` (each read once, then reused).

    Fields start as None and are filled on first use; ``dense_rows`` is keyed by ``(R, ranks)``, the
    rank pattern of a layer, so layers sharing one pattern share the entry.
    """

    plan: LoRAPlan
    # A layer's own plan whose dropped slots must cost nothing (MiLoRA's per-module routes): the
    # methods then compute only the tokens that have some adapter, and auto never picks seq_bmm.
    sparse: bool = False
    seq_len: int | None = None  # tokens per sequence when all are equal, else 0
    used: list[int] | None = None  # adapters with at least one row
    empty_slots: bool | None = None  # whether some sequence has a -1 slot
    groups: list[HostGroup] | None = None
    coef: torch.Tensor | None = None  # [T, L] float32 summed plan weight per token and adapter
    dense_rows: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor | None, torch.Tensor]] = field(
        default_factory=dict
    )
    # (R, ranks, scales, dtype) of a layer -> None (not dense) or (rows, [T, n] coefficients): layers
    # with one rank pattern and scales (most of a model) share the dense method's coefficients.
    dense_coef: dict[tuple, object] = field(default_factory=dict)
    active: torch.Tensor | None | bool = False  # see active_tokens (False: not read yet)

    def uniform_seq_len(self) -> int:
        if self.seq_len is None:
            lengths = self.plan.seq_offsets.diff()
            uniform = lengths.numel() > 0 and bool((lengths == lengths[0]).all())
            self.seq_len = int(lengths[0]) if uniform else 0
        return self.seq_len

    def used_adapters(self) -> list[int]:
        if self.used is None:
            self.used = [a for a, count in enumerate(self.plan.row_counts.tolist()) if count > 0]
        return self.used

    def has_empty_slots(self) -> bool:
        if self.empty_slots is None:
            self.empty_slots = bool((self.plan.seq_adapter < 0).any())
        return self.empty_slots

    def active_tokens(self) -> torch.Tensor | None:
        """``[T_a]`` int64: the tokens with at least one adapter slot, for a sparse cache where some
        token has none; None otherwise (every token is computed)."""
        if self.active is False:
            self.active = None
            if self.sparse and self.plan.num_tokens:
                has = (self.plan.token_adapter >= 0).any(1)
                if not bool(has.all()):
                    self.active = has.nonzero().squeeze(1)
        return self.active

    def host_groups(self) -> list[HostGroup]:
        if self.groups is None:
            self.groups = _host_groups(self.plan)
        return self.groups

    def token_coefficients(self) -> torch.Tensor:
        if self.coef is None:
            self.coef = _coefficients(self.plan, self.plan.token_weight)
        return self.coef

    def rank_rows(self, rank_list: list[int], R: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Rows of the flattened ``[L*R]`` stack in use (None: all) and the adapter of each row."""
        key = (R, tuple(rank_list))
        if key not in self.dense_rows:
            plan, used = self.plan, self.used_adapters()
            rows = [a * R + j for a in used for j in range(rank_list[a])]
            row_adapter = torch.tensor(
                [a for a in used for _ in range(rank_list[a])], dtype=torch.long, device=plan.device
            )
            every = len(rows) == plan.num_adapters * R
            if every:
                taken = None
            elif rows and rows[-1] - rows[0] + 1 == len(rows):
                taken = slice(rows[0], rows[-1] + 1)  # consecutive (one adapter, say): a view, no copy
            else:
                taken = torch.tensor(rows, dtype=torch.long, device=plan.device)
            self.dense_rows[key] = (taken, row_adapter)
        return self.dense_rows[key]


def dense_layer_delta(
    x: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    cache: TorchPathCache,
    out: torch.Tensor,
    rank_tuple: tuple[int, ...],
    scale_tuple: tuple[float, ...],
    adapter_weights: torch.Tensor | None = None,
) -> bool:
    """The dense method for a layer with host ranks and scales, its coefficients shared through
    ``cache`` by layers of the same pattern: adds into ``out`` and returns True, or returns False
    (changing nothing) where the batch is too large for the dense method.

    ``a_rows`` ``[L*R, K]`` and ``b_rows`` ``[L*R, N]``: the stacks flattened, zero beyond each rank.
    ``adapter_weights``: the layer's ``[S, P]`` weights replacing the plan's (not requiring grad: the
    coefficients made from them are kept in ``cache`` for the next calls with the same tensor,
    unchanged since). With a sparse cache only the tokens that have an adapter are computed.
    """
    R = a_rows.shape[0] // max(len(rank_tuple), 1)
    key = (R, rank_tuple, scale_tuple, x.dtype)
    if adapter_weights is not None:
        key += (id(adapter_weights), tensor_version(adapter_weights))
    entry = cache.dense_coef.get(key, False)
    if entry is not False and adapter_weights is not None and entry[0] is not adapter_weights:
        entry = False  # the id of a tensor that is gone, reused
    if entry is False:
        T = cache.plan.num_tokens
        used = cache.used_adapters()
        entry = (adapter_weights, None)
        if T * R <= DENSE_MAX_TOKEN_RANKS and T * sum(rank_tuple[a] for a in used) <= DENSE_MAX_TOKEN_RANKS:
            rows, row_adapter = cache.rank_rows(list(rank_tuple), R)
            scale = torch.tensor(scale_tuple, device=x.device, dtype=torch.float32)
            if adapter_weights is None:
                coef = cache.token_coefficients()
            else:
                coef = _coefficients(cache.plan, token_weights(cache.plan, adapter_weights.detach())[1])
            active = cache.active_tokens()
            if active is not None:
                coef = coef.index_select(0, active)
            coef = coef.index_select(1, row_adapter) * scale.index_select(0, row_adapter)
            entry = (adapter_weights, (rows, coef.to(x.dtype), active))
        if len(cache.dense_coef) >= _MAX_COEF_ENTRIES:
            cache.dense_coef.clear()  # weights replaced request after request under one selection
        cache.dense_coef[key] = entry
    if entry[1] is None:
        return False
    rows, coef, active = entry[1]
    if coef.shape[1] == 0:
        return True
    a_rows, b_rows = _take_rows(a_rows, rows), _take_rows(b_rows, rows)
    if active is None:
        out.addmm_(torch.mm(x, a_rows.t()).mul_(coef), b_rows)
    else:
        v = torch.mm(x.index_select(0, active), a_rows.t()).mul_(coef)
        out.index_add_(0, active, torch.mm(v, b_rows))
    return True


def _take_rows(t: torch.Tensor, rows: torch.Tensor | slice | None) -> torch.Tensor:
    """``t[rows]``: a view for None (every row) or a slice, a gathered copy for an index tensor."""
    if rows is None:
        return t
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _stack_rows(stack: torch.Tensor, rows: torch.Tensor | slice | None) -> torch.Tensor:
    """Rows ``rows`` of ``stack`` ``[L, R, C]`` flattened to ``[L*R, C]``, reading only those rows.

    ``stack`` may be a transposed view (vLLM stores B as ``[L, N, R]``): flattening it would copy every
    slot, used or not, on every layer call, so the rows are gathered from the view instead."""
    L, R, C = stack.shape
    try:
        return _take_rows(stack.view(L * R, C), rows)
    except RuntimeError:  # not viewable as [L*R, C]
        pass
    if rows is None:
        return stack.reshape(L * R, C)
    if isinstance(rows, slice):
        first, last = divmod(rows.start, R), divmod(rows.stop - 1, R)
        if first[0] == last[0]:  # within one slot (one adapter): a view
            return stack[first[0], first[1] : last[1] + 1]
        rows = torch.arange(rows.start, rows.stop, device=stack.device)
    return stack[torch.div(rows, R, rounding_mode="floor"), rows % R]


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter (inference tensors have none: -1, identity alone counts)."""
    return -1 if t.is_inference() else t._version


def _host_groups(plan: LoRAPlan) -> list[HostGroup]:
    groups: list[HostGroup] = []
    if plan.num_tokens * plan.num_slots == 0:
        return groups
    rows = plan.sorted_rows.long()
    start = 0
    for adapter, count in enumerate(plan.row_counts.tolist()):
        if count == 0:
            continue
        adapter_rows = rows[start : start + count]
        start += count
        tokens = adapter_rows // plan.num_slots
        first, last = int(tokens[0]), int(tokens[-1])
        # Rows are sorted by (adapter, token, slot): the group is a plain slice exactly when it has one
        # row per token of [first, last] (an id repeated in a row gives a token two rows).
        contiguous = last - first + 1 == count and bool((tokens.diff() > 0).all())
        groups.append(HostGroup(adapter, tokens, adapter_rows, first, last + 1, contiguous))
    return groups


def _coefficients(plan: LoRAPlan, token_weight: torch.Tensor) -> torch.Tensor:
    """``[T, L]``: the summed fusion weight of each adapter for each token (empty slots dropped)."""
    ids = plan.token_adapter.long()
    L = plan.num_adapters
    coef = torch.zeros(plan.num_tokens, L + 1, device=plan.device, dtype=token_weight.dtype)
    coef = coef.scatter_add(1, torch.where(ids >= 0, ids, L), token_weight)  # empty slots: column L
    return coef[:, :L]


def token_weights(plan: LoRAPlan, adapter_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq_weight [S, P], token_weight [T, P])``: the plan's, or ``adapter_weights`` ``[S, P]``
    in their place (0 in empty slots; differentiable in ``adapter_weights``)."""
    if adapter_weights is None:
        return plan.seq_weight, plan.token_weight
    weights = adapter_weights.to(torch.promote_types(adapter_weights.dtype, torch.float32))  # float64 stays
    seq_weight = torch.where(
        plan.seq_adapter >= 0, weights, torch.zeros((), device=plan.device, dtype=weights.dtype)
    )
    if plan.num_tokens == 0 or seq_weight.shape[0] == 0:
        return seq_weight, torch.zeros(
            plan.num_tokens, plan.num_slots, device=plan.device, dtype=weights.dtype
        )
    return seq_weight, seq_weight.index_select(0, plan.token_seq.long())


def fused_lora_torch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    out: torch.Tensor,
    ranks: torch.Tensor | Sequence[int] | None = None,
    scales: torch.Tensor | Sequence[float] | None = None,
    method: str = "auto",
    cache: TorchPathCache | None = None,
    adapter_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the fused LoRA delta of ``plan`` into ``out`` ``[T, N]`` in place and return it.

    ``ranks`` / ``scales``: ``[L]`` tensors or host sequences, or None (full rank, scale 1).
    ``method``: one of :data:`METHODS`; ``"auto"`` picks dense for small batches, seq_bmm for padded
    ones, grouped otherwise. ``cache``: a :class:`TorchPathCache` of this plan (None: a fresh one).
    ``adapter_weights``: ``[S, P]`` fusion weights replacing the plan's for this call.
    Every op is recorded by autograd, so gradients flow to x, the factors and ``adapter_weights``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if cache is None:
        cache = TorchPathCache(plan)
    elif cache.plan is not plan:
        raise ValueError("the TorchPathCache was built for another plan")
    R = lora_a.shape[1]
    rank_list, keep = None, None
    if method == "auto":
        method, rank_list, keep = _auto_method(plan, cache, R, ranks, lora_a.shape[2] + lora_b.shape[1])
    elif method == "seq_bmm" and cache.uniform_seq_len() > 0:
        keep = _slot_rank_mask(plan, cache, ranks, R)
    if method == "dense":
        rank_list = _rank_list(plan, ranks, R) if rank_list is None else rank_list
        return _dense(x, lora_a, lora_b, plan, out, scales, cache, rank_list, adapter_weights)
    if method == "seq_bmm":
        return _seq_bmm(x, lora_a, lora_b, plan, out, scales, cache, keep, adapter_weights)
    return _grouped(x, lora_a, lora_b, plan, out, ranks, scales, cache, adapter_weights)


def pick_method(
    plan: LoRAPlan,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor | Sequence[int] | None = None,
    cache: TorchPathCache | None = None,
) -> str:
    """The method ``method="auto"`` runs for this plan and layer: "dense", "seq_bmm" or "grouped"
    (``lora_a`` ``[L, R, K]``, ``lora_b`` ``[L, N, R]``; only their shapes are read)."""
    cache = TorchPathCache(plan) if cache is None else cache
    return _auto_method(plan, cache, lora_a.shape[1], ranks, lora_a.shape[2] + lora_b.shape[1])[0]


def _rank_list(plan: LoRAPlan, ranks, R: int) -> list[int]:
    return [R] * plan.num_adapters if ranks is None else torch.as_tensor(ranks).tolist()


def _auto_method(plan: LoRAPlan, cache: TorchPathCache, R: int, ranks, width: int):
    """``(method, rank_list, keep)``: the auto choice for a layer of ``width`` = K + N, with the host
    rank list (dense) and seq_bmm's rank/slot mask when the choice read them on the way (else None)."""
    T = plan.num_tokens
    rank_list = None
    if T * R <= DENSE_MAX_TOKEN_RANKS:
        # T * R first: it needs no host work, and keeps the per-layer cost of prefill batches at zero.
        rank_list = _rank_list(plan, ranks, R)
        if T * sum(rank_list[a] for a in cache.used_adapters()) <= DENSE_MAX_TOKEN_RANKS:
            return "dense", rank_list, None
    if cache.sparse:
        # seq_bmm would multiply the dropped slots by zero weights: work for nothing
        return "grouped", None, None
    seq_len = cache.uniform_seq_len()
    keep = _slot_rank_mask(plan, cache, ranks, R) if seq_len > 0 else None
    few_unmasked_pairs = plan.seq_adapter.numel() <= SEQ_BMM_MAX_PAIRS and keep is None
    if seq_len >= SEQ_BMM_MIN_TOKENS or (seq_len > 0 and few_unmasked_pairs):
        return "seq_bmm", None, keep
    if T * R * width <= DENSE_OVER_GROUPED_MAX_ADAPTER_MACS:
        # Grouped pays ~5 small ops per adapter; dense does every used adapter on every token instead.
        rank_list = _rank_list(plan, ranks, R) if rank_list is None else rank_list
        if T * sum(rank_list[a] for a in cache.used_adapters()) <= DENSE_OVER_GROUPED_MAX_TOKEN_RANKS:
            return "dense", rank_list, None
    return "grouped", None, None


def _scaled(v: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``v * coef``, in place unless autograd needs ``v`` for the gradient of ``coef``."""
    return v * coef if coef.requires_grad and torch.is_grad_enabled() else v.mul_(coef)


def _grouped(x, lora_a, lora_b, plan, out, ranks, scales, cache, adapter_weights):
    ranks = ranks.tolist() if isinstance(ranks, torch.Tensor) else ranks
    scales = scales.tolist() if isinstance(scales, torch.Tensor) else scales
    flat_weight = token_weights(plan, adapter_weights)[1].reshape(-1)
    for group in cache.host_groups():
        a = group.adapter
        r = lora_a.shape[1] if ranks is None else int(ranks[a])
        if r == 0:
            continue
        weights = flat_weight.index_select(0, group.rows).to(x.dtype).unsqueeze(1)
        if scales is not None:
            weights = weights * scales[a]
        shrink_w = lora_a[a, :r].t()
        expand_w = lora_b[a, :, :r].t()
        if group.contiguous:
            v = _scaled(torch.mm(x[group.start : group.stop], shrink_w), weights)
            out[group.start : group.stop].addmm_(v, expand_w)
        else:
            v = _scaled(torch.mm(x.index_select(0, group.tokens), shrink_w), weights)
            out.index_add_(0, group.tokens, torch.mm(v, expand_w))
    return out


def _dense(x, lora_a, lora_b, plan, out, scales, cache, rank_list, adapter_weights):
    """Small batches: ``out += ((x @ A_rows^T) * coef) @ B_rows`` over the used rank rows."""
    rows, row_adapter = cache.rank_rows(rank_list, lora_a.shape[1])
    if row_adapter.numel() == 0:
        return out
    # Only rows below each rank are read, so whatever lies beyond a rank never enters the sums.
    a_rows, b_rows = _stack_rows(lora_a, rows), _stack_rows(lora_b.transpose(1, 2), rows)
    if adapter_weights is None:
        coef = cache.token_coefficients()
    else:
        coef = _coefficients(plan, token_weights(plan, adapter_weights)[1])
    coef = coef.index_select(1, row_adapter).to(x.dtype)  # [T, n]
    if scales is not None:
        coef = coef * torch.as_tensor(scales, device=x.device, dtype=x.dtype).index_select(0, row_adapter)
    active = cache.active_tokens()
    if active is None:
        out.addmm_(_scaled(torch.mm(x, a_rows.t()), coef), b_rows)
    else:  # a sparse plan: tokens without an adapter are not computed
        v = _scaled(torch.mm(x.index_select(0, active), a_rows.t()), coef.index_select(0, active))
        out.index_add_(0, active, torch.mm(v, b_rows))
    return out


def _slot_rank_mask(plan: LoRAPlan, cache: TorchPathCache, ranks, R: int) -> torch.Tensor | None:
    """``[S*P, R]`` bool: rank units in use per (sequence, slot); None when every one is."""
    S, P = plan.seq_adapter.shape
    keep = None
    if ranks is not None:
        ranks = torch.as_tensor(ranks, device=plan.device)
        keep = (
            torch.arange(R, device=plan.device)
            < ranks.index_select(0, plan.seq_adapter.clamp(min=0).reshape(-1))[:, None]
        )
    if cache.has_empty_slots():
        in_use = (plan.seq_adapter >= 0).reshape(-1, 1)
        keep = in_use.expand(S * P, R) if keep is None else keep & in_use
    return None if keep is None or bool(keep.all()) else keep


def _seq_bmm(x, lora_a, lora_b, plan, out, scales, cache, keep, adapter_weights):
    """Padded batch: gather each sequence's P adapters as one rank-P*R LoRA, then two bmm calls."""
    S, P = plan.seq_adapter.shape
    seq_len = cache.uniform_seq_len()
    if seq_len == 0:
        raise ValueError("method='seq_bmm' needs sequences of one common, non-zero length")
    _, R, K = lora_a.shape
    N = lora_b.shape[1]
    flat_ids = plan.seq_adapter.clamp(min=0).reshape(-1)
    # index_select on the [L, R, N] view: a contiguous gather when B is stored that way (the layers do).
    a_sel = lora_a.index_select(0, flat_ids)  # [S*P, R, K]
    b_sel = lora_b.transpose(1, 2).index_select(0, flat_ids)  # [S*P, R, N]
    coef = token_weights(plan, adapter_weights)[0].to(x.dtype).reshape(-1)
    if scales is not None:
        coef = coef * torch.as_tensor(scales, device=x.device, dtype=x.dtype).index_select(0, flat_ids)
    if keep is not None:
        # Zero (not just skip) what lies beyond a rank or in an empty slot: it may hold anything, NaN included.
        a_sel.masked_fill_(~keep[:, :, None], 0)
        b_sel.masked_fill_(~keep[:, :, None], 0)
    v = torch.bmm(x.view(S, seq_len, K), a_sel.view(S, P * R, K).transpose(1, 2))  # [S, len, P*R]
    v = _scaled(v, coef.repeat_interleave(R).view(S, 1, P * R))
    out.view(S, seq_len, N).baddbmm_(v, b_sel.view(S, P * R, N))
    return out


# One shrink for layers that read the same input (q/k/v, gate/up): their A stacked along the rank axis
# ("cat_a" [L, R_tot, K], zero beyond each layer's ranks), shrunk once; each layer expands its columns.


def shrink_shared(
    x: torch.Tensor, cat_a: torch.Tensor, plan: LoRAPlan, cache: TorchPathCache
) -> tuple[str, torch.Tensor] | None:
    """The raw shrink ``x @ A^T`` of a stacked ``cat_a``, for the methods that can share it:
    ``("dense", v [T, U*R_tot])`` over the used adapters (a sparse cache: ``[T_a, U*R_tot]`` over its
    active tokens) or ``("seq_bmm", v [S, len, P, R_tot])``; None where the grouped method serves the
    batch (each layer then runs alone)."""
    L, Rt, K = cat_a.shape
    T = plan.num_tokens
    used = cache.used_adapters()
    if T * Rt * max(len(used), 1) <= DENSE_MAX_TOKEN_RANKS:
        rows, _ = cache.rank_rows([Rt] * L, Rt)
        a_rows = _take_rows(cat_a.reshape(L * Rt, K), rows)
        active = cache.active_tokens()
        return "dense", torch.mm(x if active is None else x.index_select(0, active), a_rows.t())
    if cache.sparse:
        return None
    seq_len = cache.uniform_seq_len()
    few = plan.seq_adapter.numel() <= SEQ_BMM_MAX_PAIRS and not cache.has_empty_slots()
    if seq_len >= SEQ_BMM_MIN_TOKENS or (seq_len > 0 and few):
        S, P = plan.seq_adapter.shape
        a_sel = cat_a.index_select(0, plan.seq_adapter.clamp(min=0).reshape(-1))  # [S*P, R_tot, K]
        v = torch.bmm(x.view(S, seq_len, K), a_sel.view(S, P * Rt, K).transpose(1, 2))
        return "seq_bmm", v.view(S, seq_len, P, Rt)
    return None


def expand_shared(
    shrunk: tuple[str, torch.Tensor],
    offset: int,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    cache: TorchPathCache,
    out: torch.Tensor,
    scales: torch.Tensor | None = None,
    adapter_weights: torch.Tensor | None = None,
    scale_tuple: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Add one layer's delta into ``out`` from a :func:`shrink_shared` result: its ``R`` columns start
    at ``offset``; ``lora_b`` ``[L, N, R]`` must hold zeros beyond each rank (the layers' stacks do).
    ``scale_tuple``: ``scales`` on the host, to share the dense coefficients through ``cache``."""
    kind, v = shrunk
    L, N, R = lora_b.shape
    if kind == "dense":
        T = v.shape[0]
        rows, row_adapter = cache.rank_rows([R] * L, R)
        if row_adapter.numel() == 0:
            return out
        v_m = v.view(T, row_adapter.numel() // R, -1)[:, :, offset : offset + R].reshape(T, -1)
        b_rows = _stack_rows(lora_b.transpose(1, 2), rows)
        active = cache.active_tokens()
        reuse = scale_tuple is not None and (adapter_weights is None or not adapter_weights.requires_grad)
        key = ("shared", R, scale_tuple, v.dtype)
        if adapter_weights is not None:
            key += (id(adapter_weights), tensor_version(adapter_weights))
        entry = cache.dense_coef.get(key) if reuse else None
        coef = entry[1] if entry is not None and entry[0] is adapter_weights else None
        if coef is None:
            if adapter_weights is None:
                coef = cache.token_coefficients()
            else:
                coef = _coefficients(plan, token_weights(plan, adapter_weights)[1])
            if active is not None:
                coef = coef.index_select(0, active)
            coef = coef.index_select(1, row_adapter).to(v.dtype)
            if scales is not None:
                coef = coef * scales.to(v.dtype).index_select(0, row_adapter)
            if reuse:
                if len(cache.dense_coef) >= _MAX_COEF_ENTRIES:
                    cache.dense_coef.clear()
                cache.dense_coef[key] = (adapter_weights, coef)
        if active is None:
            return out.addmm_(v_m * coef, b_rows)
        return out.index_add_(0, active, torch.mm(v_m * coef, b_rows))
    S, seq_len, P, _ = v.shape
    flat_ids = plan.seq_adapter.clamp(min=0).reshape(-1)
    coef = token_weights(plan, adapter_weights)[0].to(v.dtype).reshape(-1)
    if scales is not None:
        coef = coef * scales.to(v.dtype).index_select(0, flat_ids)
    v_m = (v[..., offset : offset + R] * coef.view(S, 1, P, 1)).reshape(S, seq_len, P * R)
    b_sel = lora_b.transpose(1, 2).index_select(0, flat_ids)  # [S*P, R, N]
    out.view(S, seq_len, N).baddbmm_(v_m, b_sel.view(S, P * R, N))
    return out
