"""``MultiLoRALinear``: a base ``nn.Linear`` / GPT-2 ``Conv1D`` plus the stacked LoRAs of many adapters.

The layer keeps the base module as its child ``base`` (its weight is not copied) and holds, in the
base weight's dtype and device, the adapters' factors stacked to the largest rank ``R`` of the layer:

    lora_a  [L, R, K]   adapter i's A in lora_a[i, :ranks[i]]   (zeros beyond)
    lora_b  [L, N, R]   adapter i's B in lora_b[i, :, :ranks[i]]   (stored [L, R, N]: a transposed view)
    ranks   [L] int32   0 for an adapter that does not adapt this module
    scales  [L] float32 PEFT's lora_alpha / r (or / sqrt(r) with rsLoRA)

Forward: ``y = base(x)``, then the fused delta of every row's adapter mix is added into ``y`` in place
by :func:`dlplora_triton.ops.fused_lora_planned`. The routing plan is not built here: all layers of a
model share one :class:`PlanSource` that hands out the plan of the current batch (built once per
batch shape and selection, see ``dlplora_triton.patch``). The layer knows nothing of adapter names,
files or routers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .backends.torch_path import TorchPathCache
from .modules import linear_features
from .ops import dense_layer_delta, expand_shared, fused_lora_planned, shrink_shared
from .plan import LoRAPlan

__all__ = ["MultiLoRALinear", "ModuleRoute", "PlanSource", "FixedPlan", "ShrinkGroup", "stack_factors"]


@dataclass(frozen=True, eq=False)
class ModuleRoute:
    """The slots of the selection that one layer drops (MiLoRA: a module whose gate is 0 for a row).

    ``key``: the flat indices ``s * P + p`` of the dropped slots, sorted (layers with the same key get
    the same plan); ``dropped``: ``[S, P]`` bool on the layers' device; ``adapter_mask``: bit ``i`` set
    when adapter ``i`` is still used by some slot that is not dropped (0: the layer does no LoRA work).
    Made by ``MultiLoRA.set_module_gates`` once per gate update (at MiLoRA's prefill), never per step.
    """

    key: tuple[int, ...]
    dropped: torch.Tensor
    adapter_mask: int


class PlanSource:
    """Where the :class:`MultiLoRALinear` layers of one model get the plan of the current forward pass.

    ``adapter_mask`` has bit ``i`` set when adapter ``i`` is used by some row of the batch (0: every
    row gets the base model, layers skip all LoRA work; -1: treat every adapter as used).
    ``plan_for(x)`` returns the plan for a layer input ``x`` (``[..., K]``); it is called only when
    some adapter of the layer is used, and should return the same plan object to every layer.
    """

    adapter_mask: int = 0
    active: bool = False  # adapter_mask != 0, kept by the source (what torch.compile guards on)

    def plan_for(self, x: torch.Tensor) -> LoRAPlan:
        raise NotImplementedError(f"{type(self).__name__} must implement plan_for(x)")

    def batch_for(
        self, x: torch.Tensor, route: ModuleRoute | None = None
    ) -> tuple[LoRAPlan, TorchPathCache | None]:
        """The plan for ``x`` and the PyTorch path's cache of it (None: none kept).

        ``route``: slots this layer drops (a layer with a :class:`ModuleRoute` calls with it). A source
        may return a plan without those slots (no work for them) or ignore ``route``: the layer's
        per-row weights are 0 there, so either is exact.
        """
        return self.plan_for(x), None


class FixedPlan(PlanSource):
    """A plan built by the caller, used for every input (its ``num_tokens`` must match the input)."""

    def __init__(self, plan: LoRAPlan):
        self.plan = plan
        self.cache = TorchPathCache(plan)
        self.adapter_mask = -1 if plan.num_tokens * plan.num_slots > 0 else 0
        self.active = self.adapter_mask != 0

    def plan_for(self, x: torch.Tensor) -> LoRAPlan:
        return self.plan

    def batch_for(self, x: torch.Tensor, route: ModuleRoute | None = None) -> tuple[LoRAPlan, TorchPathCache]:
        return self.plan, self.cache


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
        self.route: ModuleRoute | None = None
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
        self.lora_a, self.lora_b = lora_a, lora_b
        self.ranks = torch.tensor(ranks, dtype=torch.int32, device=lora_a.device)
        self.scales = torch.tensor(scales, dtype=torch.float32, device=lora_a.device)
        # Host copies (for factors() and repr) and the bit set of the adapters this layer has.
        self._rank_list = ranks
        self._scale_list = scales
        self._rank_tuple, self._scale_tuple = tuple(ranks), tuple(scales)
        self._adapter_mask = sum(1 << i for i, r in enumerate(ranks) if r > 0)

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor, float] | None]:
        """The adapters as ``(A [r, K], B [N, r], scale)`` views of the stacks, None where rank is 0."""
        return [
            None if r == 0 else (self.lora_a[i, :r], self.lora_b[i, :, :r], s)
            for i, (r, s) in enumerate(zip(self._rank_list, self._scale_list))
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
        if source is None:
            return y
        route = self.route
        if torch.compiler.is_compiling():
            # Under torch.compile read only whether some adapter is used: the mask differs between
            # routings, and a value read here would make every new routing compile again. A route is
            # not followed there (the row weights, 0 in its dropped slots, keep the result exact).
            if not source.active:
                return y
            route = None
        elif not ((source.adapter_mask if route is None else route.adapter_mask) & self._adapter_mask):
            return y  # no row uses an adapter of this layer (or every row that does dropped it here)
        plan, cache = source.batch_for(x) if route is None else source.batch_for(x, route)
        if not y.is_contiguous():
            y = y.contiguous()
        group = self.shrink_group
        eager_cpu = (
            cache is not None
            and not x.is_cuda
            and self.backend != "triton"
            and not torch.compiler.is_compiling()
        )
        weights = self.row_weights
        trusted_weights = weights is None or not (weights.requires_grad and torch.is_grad_enabled())
        shares = group is not None and eager_cpu and group.shares(self)
        if eager_cpu and not shares and trusted_weights and x.dtype == self.lora_a.dtype:
            # Views taken per call: .to() and set_stacks replace the stacks.
            a, b_t = self.lora_a, self.lora_b.transpose(1, 2)
            fits = x.numel() == plan.num_tokens * self.in_features and plan.num_adapters == a.shape[0]
            if a.is_contiguous() and b_t.is_contiguous() and fits:
                L, R = a.shape[:2]
                flat = (a.view(L * R, self.in_features), b_t.view(L * R, self.out_features))
                out = y.view(-1, self.out_features)
                if dense_layer_delta(
                    x.reshape(-1, self.in_features),
                    *flat,
                    cache,
                    out,
                    self._rank_tuple,
                    self._scale_tuple,
                    weights,
                ):
                    return y
        if shares:
            shrunk = group.shrink(self, x, plan, cache)
            if shrunk is not None:
                expand_shared(
                    shrunk,
                    group.offset(self),
                    self.lora_b,
                    plan,
                    cache,
                    y.view(-1, self.out_features),
                    self.scales,
                    weights,
                    self._scale_tuple,
                )
                return y
        # ranks / scales as the tensors held here: fused_lora_planned takes them as they are on every
        # backend, where host lists would be converted to tensors on each call.
        fused_lora_planned(
            x.reshape(-1, self.in_features),
            self.lora_a,
            self.lora_b,
            plan,
            ranks=self.ranks,
            scales=self.scales,
            out=y.view(-1, self.out_features),
            backend=self.backend,
            adapter_weights=weights,
            cache=cache,
        )
        return y

    def extra_repr(self) -> str:
        ranks = ",".join(map(str, self._rank_list))
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.num_adapters}, ranks=[{ranks}]"


class ShrinkGroup:
    """Layers that read the same input tensor (q/k/v, gate/up): their A stacked along the rank axis so
    one shrink matmul on the PyTorch path serves all of them.

    The first member called with an input computes the shrink of the stacked A and keeps it; the
    others called with that same tensor (same object, unchanged since) expand their columns of it;
    it is dropped once every member has used it. Any other input, a change of a member's stacks, or
    a member whose A requires grad makes the member run alone, so results never depend on the
    grouping. On CUDA and under torch.compile members run alone.
    """

    def __init__(self, members: Sequence[MultiLoRALinear]):
        if len(members) < 2:
            raise ValueError(f"a shrink group needs at least two layers, got {len(members)}")
        K = members[0].in_features
        if any(m.in_features != K or m.num_adapters != members[0].num_adapters for m in members):
            raise ValueError("the layers of a shrink group must share K and the adapter count L")
        self.members = list(members)
        self._stacked: torch.Tensor | None = None
        self._sources: list[tuple[torch.Tensor, int]] = []
        self._offsets: dict[int, int] = {}
        self._pending: tuple | None = None
        for m in self.members:
            m.shrink_group = self

    def offset(self, layer: MultiLoRALinear) -> int:
        return self._offsets[self.members.index(layer)]

    def shares(self, layer: MultiLoRALinear) -> bool:
        """Whether ``layer`` may take the shared shrink: every member keeps the same slots (the same
        :class:`ModuleRoute` key, so the same plan), and none skips its LoRA work. Members that drop
        different rows (MiLoRA rows picking different members) each run alone on their own plan."""
        route = layer.route
        key = None if route is None else route.key
        for m in self.members:
            r = m.route
            if (None if r is None else r.key) != key or (
                r is not None and not (r.adapter_mask & m._adapter_mask)
            ):
                return False
        return True

    def _stacks(self) -> torch.Tensor | None:
        """``[L, R_tot, K]``: the members' A side by side (rebuilt when one of them changed)."""
        current = [(m.lora_a, _version(m.lora_a)) for m in self.members]
        if any(a.requires_grad for a, _ in current):
            return None
        fresh = len(current) == len(self._sources) and all(
            a is b and va == vb for (a, va), (b, vb) in zip(current, self._sources)
        )
        if not fresh:
            self._stacked = torch.cat([m.lora_a for m in self.members], dim=1)
            offsets, total = {}, 0
            for i, m in enumerate(self.members):
                offsets[i], total = total, total + m.lora_a.shape[1]
            self._offsets, self._sources, self._pending = offsets, current, None
        return self._stacked

    def shrink(self, layer: MultiLoRALinear, x: torch.Tensor, plan: LoRAPlan, cache: TorchPathCache):
        """The shared shrink for ``layer``'s input ``x``, or None when ``layer`` must run alone."""
        pending = self._pending
        if (
            pending is None
            or pending[0] is not x
            or pending[1] != _version(x)
            or pending[2] is not plan
            or layer in pending[4]
        ):
            stacked = self._stacks()
            if stacked is None or stacked.dtype != x.dtype or stacked.device != x.device:
                return None
            shrunk = shrink_shared(x.reshape(-1, x.shape[-1]), stacked, plan, cache)
            if shrunk is None:
                self._pending = None
                return None
            pending = self._pending = (x, _version(x), plan, shrunk, [])
        pending[4].append(layer)
        if len(pending[4]) == len(self.members):
            self._pending = None
        return pending[3]


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter (inference tensors have none: -1, identity alone counts)."""
    return -1 if t.is_inference() else t._version
