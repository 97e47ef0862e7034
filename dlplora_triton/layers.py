"""``MultiLoRALinear``: a base ``nn.Linear`` / GPT-2 ``Conv1D`` plus the stacked LoRAs of many adapters.

The layer keeps the base module as its child ``base`` (its weight is not copied) and holds, in the
base weight's dtype and device, the adapters' factors stacked to the largest rank ``R`` of the layer:

    lora_a  [L, R, K]   adapter i's A in lora_a[i, :ranks[i]]   (zeros beyond)
    lora_b  [L, N, R]   adapter i's B in lora_b[i, :, :ranks[i]]   (stored [L, R, N]: a transposed view)
    ranks   [L] int32   0 for an adapter that does not adapt this module
    scales  [L] float32 PEFT's lora_alpha / r (or / sqrt(r) with rsLoRA)

Forward: ``y = base(x)``, then one :func:`dlplora_triton.ops.add_layer_delta` call adds the fused
delta of every row's adapter mix into ``y`` in place. The batch is not built here: all layers of a
model share one :class:`PlanSource` that hands out the prepared batch
(:class:`~dlplora_triton.ops.LoRABatch`: the plan and what is derived from it) of the current forward,
built once per batch shape and selection (``dlplora_triton.patch``). The layer knows nothing of
adapter names, files or routers.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ._moved import moved_names
from .batch import tensor_version
from .modules import linear_features
from .ops import DroppedSlots, LoRABatch, LoRAStacks, SharedShrink, add_layer_delta
from .plan import LoRAPlan

__all__ = ["MultiLoRALinear", "DroppedSlots", "PlanSource", "FixedPlan", "ShrinkGroup", "stack_factors"]


class PlanSource:
    """Where the :class:`MultiLoRALinear` layers of one model get the batch of the current forward pass.

    ``adapter_mask`` has bit ``i`` set when adapter ``i`` is used by some row of the batch (0: every
    row gets the base model, layers skip all LoRA work; -1: treat every adapter as used).
    A source implements ``batch(x)`` (the :class:`~dlplora_triton.ops.LoRABatch` for a layer input
    ``x`` ``[..., K]``, the same object for every layer of a forward pass), or only ``plan_for(x)``,
    whose plan is then wrapped in a batch once.
    """

    adapter_mask: int = 0
    active: bool = False  # adapter_mask != 0, kept by the source (what torch.compile guards on)
    _wrapped: LoRABatch | None = None

    def plan_for(self, x: torch.Tensor) -> LoRAPlan:
        raise NotImplementedError(f"{type(self).__name__} must implement batch(x) or plan_for(x)")

    def batch(self, x: torch.Tensor) -> LoRABatch:
        plan = self.plan_for(x)
        if self._wrapped is None or self._wrapped.plan is not plan:
            self._wrapped = LoRABatch(plan)
        return self._wrapped

    def batch_for(self, x: torch.Tensor, route: DroppedSlots | None = None):
        """Deprecated: ``(plan, host data)`` for ``x``; use ``batch(x)`` (and ``.dropping(slots)``)."""
        warnings.warn(
            "PlanSource.batch_for is deprecated: use batch(x), and batch(x).dropping(slots) for dropped slots",
            DeprecationWarning,
            stacklevel=2,
        )
        batch = self.batch(x) if route is None else self.batch(x).dropping(route)
        return batch.plan, batch.host

    def layer_batch(
        self, x: torch.Tensor, dropped: DroppedSlots | None, adapter_mask: int
    ) -> LoRABatch | None:
        """The batch a layer with adapters ``adapter_mask`` runs on, or None when no row uses one of them
        there (the layer then adds nothing). ``dropped``: the slots the layer drops (MiLoRA), if any."""
        if torch.compiler.is_compiling():
            # Under torch.compile read only whether some adapter is used: the mask differs between
            # selections, and a value read here would make every new one compile again. Dropped slots
            # are not dropped there (the row weights, 0 in its dropped slots, keep the result exact).
            return self.batch(x) if self.active else None
        if not ((self.adapter_mask if dropped is None else dropped.adapter_mask) & adapter_mask):
            return None  # no row uses an adapter of this layer (or every row that does dropped it here)
        batch = self.batch(x)
        return batch if dropped is None else batch.dropping(dropped)


class FixedPlan(PlanSource):
    """A plan (or a prepared :class:`~dlplora_triton.ops.LoRABatch`) built by the caller, used for every
    input (its ``num_tokens`` must match the input)."""

    def __init__(self, plan: LoRAPlan | LoRABatch):
        self.prepared = plan if isinstance(plan, LoRABatch) else LoRABatch(plan)
        self.plan = self.prepared.plan
        self.adapter_mask = -1 if self.plan.num_tokens * self.plan.num_slots > 0 else 0
        self.active = self.adapter_mask != 0

    def plan_for(self, x: torch.Tensor) -> LoRAPlan:
        return self.plan

    def batch(self, x: torch.Tensor) -> LoRABatch:
        return self.prepared


def stack_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None],
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[float]]:
    """Stack per-adapter factors ``(A [r, K], B [N, r], scale)`` (None: adapter not here) into
    ``lora_a [L, R, K]``, ``lora_b [L, N, R]`` (zero-padded), host ``ranks`` and ``scales``."""
    ranks = [0 if f is None else int(f[0].shape[0]) for f in factors]
    scales = [0.0 if f is None else float(f[2]) for f in factors]
    L, R = len(factors), max(ranks, default=0)
    lora_a = torch.zeros(L, R, in_features, dtype=dtype, device=device)
    # lora_b is [L, N, R] stored as [L, R, N] (a transposed view): gathering the B of each row then
    # gives [S, P, R, N] directly, so the PyTorch path multiplies by it without a transposing copy.
    lora_b = torch.zeros(L, R, out_features, dtype=dtype, device=device).transpose(1, 2)
    for i, f in enumerate(factors):
        if f is None:
            continue
        a, b, _ = f
        r = ranks[i]
        if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
            raise ValueError(
                f"adapter {i}: A {list(a.shape)} and B {list(b.shape)} do not fit a layer with "
                f"K = {in_features}, N = {out_features} (expected [r, K] and [N, r])"
            )
        lora_a[i, :r].copy_(a)
        lora_b[i, :, :r].copy_(b)
    return lora_a, lora_b, ranks, scales


class MultiLoRALinear(nn.Module):
    """A base ``nn.Linear`` or ``Conv1D`` (kept as child ``base``) plus ``L`` stacked LoRA adapters.

    Args:
        base: the wrapped module; its weight is used in place, never copied.
        lora_a: ``[L, R, K]`` stacked A, the base weight's dtype and device.
        lora_b: ``[L, N, R]`` stacked B.
        ranks: ``L`` ints in ``0..R`` (0: the adapter does not adapt this module).
        scales: ``L`` floats.
        plan_source: the shared :class:`PlanSource`; None keeps the layer equal to ``base``.

    Semantics of ``forward(x)`` (``x`` ``[..., K]``, tokens of row ``s`` in ``plan``'s sequence ``s``)::

        y = base(x)
        for every token t of sequence s, slot p with adapter i = plan.adapter_ids[s, p] >= 0:
            y[t] += weight[s, p] * scales[i] * (x[t] @ lora_a[i, :ranks[i]].T) @ lora_b[i, :, :ranks[i]].T

    Example::

        layer = MultiLoRALinear.from_factors(nn.Linear(64, 32), [(a0, b0, 2.0), None], FixedPlan(plan))
        y = layer(x)            # x [T, 64]; rows of plan's sequences get their adapter mix
    """

    def __init__(
        self,
        base: nn.Module,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        ranks: Sequence[int],
        scales: Sequence[float],
        plan_source: PlanSource | None = None,
    ):
        super().__init__()
        features = linear_features(base)
        if features is None:
            raise TypeError(
                f"MultiLoRALinear wraps nn.Linear or transformers' Conv1D with a floating-point weight, "
                f"got {type(base).__name__}"
            )
        self.in_features, self.out_features = features
        self.base = base
        self.plan_source = plan_source
        # [S, P] float fusion weights replacing the plan's in this layer (MultiLoRA.set_module_gates), or None.
        self.row_weights: torch.Tensor | None = None
        # Slots of the selection this layer skips (their row_weights are 0), or None: every slot.
        self.dropped_slots: DroppedSlots | None = None
        # "auto": Triton on CUDA tensors, the PyTorch path on CPU; "triton" runs the kernels on CPU
        # tensors too (under TRITON_INTERPRET=1: the tests); "torch" the PyTorch path everywhere.
        self.backend = "auto"
        self.shrink_group: ShrinkGroup | None = None  # layers reading the same input (one shrink for all)
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.register_buffer("ranks", torch.zeros(0, dtype=torch.int32), persistent=False)
        self.register_buffer("scales", torch.zeros(0, dtype=torch.float32), persistent=False)
        self.set_stacks(lora_a, lora_b, ranks, scales)

    @classmethod
    def from_factors(
        cls,
        base: nn.Module,
        factors: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None],
        plan_source: PlanSource | None = None,
    ) -> MultiLoRALinear:
        """Wrap ``base`` with adapters given as ``(A [r, K], B [N, r], scale)`` or None each."""
        features = linear_features(base)
        if features is None:
            raise TypeError(f"MultiLoRALinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        weight = base.weight
        stacks = stack_factors(factors, *features, dtype=weight.dtype, device=weight.device)
        return cls(base, *stacks, plan_source=plan_source)

    def set_stacks(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: Sequence[int], scales: Sequence[float]
    ) -> None:
        """Replace the stacked adapters (all four together; shapes are checked first)."""
        K, N = self.in_features, self.out_features
        if lora_a.dim() != 3 or lora_a.shape[2] != K:
            raise ValueError(f"lora_a must be [L, R, K = {K}], got {list(lora_a.shape)}")
        L, R = lora_a.shape[:2]
        if tuple(lora_b.shape) != (L, N, R):
            raise ValueError(f"lora_b must be [L, N, R] = [{L}, {N}, {R}], got {list(lora_b.shape)}")
        ranks, scales = [int(r) for r in ranks], [float(s) for s in scales]
        if len(ranks) != L or len(scales) != L:
            raise ValueError(
                f"ranks and scales must have L = {L} entries, got {len(ranks)} and {len(scales)}"
            )
        if any(r < 0 or r > R for r in ranks):
            raise ValueError(f"ranks must lie in 0..R = 0..{R}, got {ranks}")
        with torch.no_grad():  # zeros beyond each rank, so a shared shrink may read whole stacks
            for i, r in enumerate(ranks):
                lora_a[i, r:].zero_()
                lora_b[i, :, r:].zero_()
        stacks = LoRAStacks.of(lora_a, lora_b, ranks, scales)
        self.lora_a, self.lora_b, self.ranks, self.scales = lora_a, lora_b, stacks.ranks, stacks.scales
        self._stacks = stacks
        self._adapter_mask = stacks.adapter_mask  # the bit set of the adapters this layer has
        if self.shrink_group is not None:
            self.shrink_group.changed()

    def _apply(self, fn, recurse: bool = True):
        # .to() / .double() / .cuda() replace the buffers: the stacks handed to ops follow them.
        super()._apply(fn, recurse)
        old = self._stacks
        self._stacks = LoRAStacks(
            self.lora_a, self.lora_b, self.ranks, self.scales, old.rank_tuple, old.scale_tuple
        )
        if self.shrink_group is not None:
            self.shrink_group.changed()
        return self

    @property
    def route(self) -> DroppedSlots | None:
        """Deprecated: :attr:`dropped_slots` (its name until 0.2)."""
        warnings.warn(
            "MultiLoRALinear.route is deprecated: use dropped_slots", DeprecationWarning, stacklevel=2
        )
        return self.dropped_slots

    @property
    def stacks(self) -> LoRAStacks:
        """The layer's adapters as plain tensors (what :func:`dlplora_triton.ops.add_layer_delta` takes)."""
        return self._stacks

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor, float] | None]:
        """The adapters as ``(A [r, K], B [N, r], scale)`` views of the stacks, None where rank is 0."""
        stacks = self._stacks
        return [
            None if r == 0 else (self.lora_a[i, :r], self.lora_b[i, :, :r], s)
            for i, (r, s) in enumerate(zip(stacks.rank_tuple, stacks.scale_tuple))
        ]

    @property
    def num_adapters(self) -> int:
        return self.lora_a.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base module's weight (``[N, K]`` for nn.Linear, ``[K, N]`` for Conv1D)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base module's bias."""
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        source = self.plan_source
        batch = None if source is None else source.layer_batch(x, self.dropped_slots, self._adapter_mask)
        if batch is None:
            return y
        y = y.contiguous()
        share = None if self.shrink_group is None else self.shrink_group.share(self, x, batch)
        add_layer_delta(x, y, self._stacks, batch, self.row_weights, self.backend, share)
        return y

    def extra_repr(self) -> str:
        ranks = ",".join(map(str, self._stacks.rank_tuple))
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.num_adapters}, ranks=[{ranks}]"


class ShrinkGroup:
    """Layers that read the same input tensor (q/k/v, gate/up): their A stacked along the rank axis so
    one shrink matmul on the PyTorch path serves all of them.

    The first member called with an input computes the shrink of the stacked A (kept in the batch,
    :meth:`~dlplora_triton.ops.LoRABatch.shared_shrink`); the others called with that same tensor
    expand their columns of it. Any other input, a member whose A requires grad, or members that run on
    different batches (MiLoRA rows picking different members, at prefill) make a member run alone, so
    results never depend on the grouping. On CUDA, with ``backend="triton"`` and under torch.compile
    members run alone.
    """

    def __init__(self, members: Sequence[MultiLoRALinear]):
        if len(members) < 2:
            raise ValueError(f"a shrink group needs at least two layers, got {len(members)}")
        K = members[0].in_features
        if any(m.in_features != K or m.num_adapters != members[0].num_adapters for m in members):
            raise ValueError("the layers of a shrink group must share K and the adapter count L")
        self.members = list(members)
        self._shares: dict[MultiLoRALinear, SharedShrink] | None = None
        self._versions: tuple[int, ...] = ()
        for m in self.members:
            m.shrink_group = self

    def changed(self) -> None:
        """A member's stacks were replaced (``set_stacks``, ``.to()``): stack the A again at next use."""
        self._shares = None

    def share(self, layer: MultiLoRALinear, x: torch.Tensor, batch: LoRABatch) -> SharedShrink | None:
        """``layer``'s part in the shared shrink of input ``x`` on ``batch``, or None where it must run
        alone: every member must run on this same batch and do LoRA work (members that drop different
        slots get plans of their own, except on small CPU batches, which keep the dropped slots at
        weight 0, see :meth:`~dlplora_triton.ops.LoRABatch.dropping`; there members no row uses are
        not waited for)."""
        if x.is_cuda or layer.backend == "triton" or torch.compiler.is_compiling():
            return None
        root, size = batch.root, 0
        for m in self.members:
            dropped = m.dropped_slots
            if dropped is not None and not (dropped.adapter_mask & m._adapter_mask):
                # No row uses it here: it returns before any LoRA work. Its columns of the stacked
                # shrink would be work for nothing, which only a batch that keeps dropped slots accepts.
                if not root.keeps_dropped_slots:
                    return None
                continue
            if (root if dropped is None else root.dropping(dropped)) is not batch:
                return None
            size += 1
        if any(m.lora_a.requires_grad or m.lora_a.dtype != x.dtype for m in self.members):
            return None
        share = self._current()[layer]
        return share if share.size == size else dataclasses.replace(share, size=size)

    def _current(self) -> dict[MultiLoRALinear, SharedShrink]:
        # The A side by side, stacked again when a member's stacks were replaced or edited in place
        # (their version counters: a copy_ into a member's lora_a must not leave a stale stack here).
        versions = tuple(tensor_version(m.lora_a) for m in self.members)
        if self._shares is None or versions != self._versions:
            stacked = torch.cat([m.lora_a for m in self.members], dim=1)
            shares, offset = {}, 0
            for i, m in enumerate(self.members):
                shares[m] = SharedShrink(self, len(self.members), i, offset, stacked)
                offset += m.lora_a.shape[1]
            self._shares, self._versions = shares, versions
        return self._shares


# Moved in 0.2: ModuleRoute is DroppedSlots (batch.py).
__getattr__ = moved_names(
    __name__,
    {
        "ModuleRoute": "dlplora_triton.batch:DroppedSlots",
    },
)
