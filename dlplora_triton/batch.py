"""The prepared batch: one forward pass's routing, built once and handed to every adapted layer.

A :class:`LoRABatch` holds what the layers of a model share for one batch: the plan
(:func:`~dlplora_triton.plan.build_plan`), the PyTorch path's host data of it (each fact read from the
device once per batch, not once per layer), its variants without the slots a module drops (MiLoRA's
per-module dropped slots, :class:`DroppedSlots`) and the shrink shared by layers that read one input. It is
the one door below the layers: ``patch``, ``layers.FixedPlan``, MiLoRA's serving and the vLLM wrapper
build batches and pass them to :func:`dlplora_triton.ops.add_layer_delta` (or
:func:`~dlplora_triton.ops.fused_lora_planned` with ``batch.plan``), and none of them reaches into
``backends/``. A layer's adapters travel as :class:`LoRAStacks`: plain tensors and their host copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._moved import moved_names
from .backends.torch_path import TorchPathCache, shrink_shared, tensor_version
from .plan import LoRAPlan, build_plan

__all__ = ["LoRABatch", "LoRAStacks", "DroppedSlots", "SharedShrink", "prepare_batch", "SPARSE_MIN_TOKENS"]

# Below this many tokens a CPU batch serves a layer's dropped slots with weight 0 instead of a plan
# without them (LoRABatch.dropping); measured by bench/bench_milora.py (README, MiLoRA serving speed).
SPARSE_MIN_TOKENS = 32


@dataclass(frozen=True, eq=False)
class DroppedSlots:
    """The slots of the selection that one layer drops (MiLoRA: a module whose gate is 0 for a row).

    ``key``: the flat indices ``s * P + p`` of the dropped slots, sorted (layers with the same key get
    the same plan); ``dropped``: ``[S, P]`` bool on the layers' device; ``adapter_mask``: bit ``i`` set
    when adapter ``i`` is still used by some slot that is not dropped (0: the layer does no LoRA work).
    Made by MiLoRA's gates (``dlplora_triton.gates``) once per gate update (at prefill), never per step.
    """

    key: tuple[int, ...]
    dropped: torch.Tensor
    adapter_mask: int


@dataclass(frozen=True, eq=False)
class LoRAStacks:
    """One layer's adapters as plain tensors: ``lora_a [L, R, K]``, ``lora_b [L, N, R]`` (zero beyond each
    rank), ``ranks [L]`` int32, ``scales [L]`` float32, and host copies of the last two (the PyTorch path
    keys its shared coefficients by them). ``adapter_mask``: bit ``i`` set when ``ranks[i] > 0``."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    rank_tuple: tuple[int, ...]
    scale_tuple: tuple[float, ...]

    @classmethod
    def of(
        cls, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: Sequence[int], scales: Sequence[float]
    ) -> LoRAStacks:
        """Stacks with ``ranks`` / ``scales`` given on the host (tensors made on ``lora_a``'s device)."""
        ranks, scales = tuple(int(r) for r in ranks), tuple(float(s) for s in scales)
        device = lora_a.device
        return cls(
            lora_a,
            lora_b,
            torch.tensor(ranks, dtype=torch.int32, device=device),
            torch.tensor(scales, dtype=torch.float32, device=device),
            ranks,
            scales,
        )

    def __post_init__(self):
        # The stacks as [L*R, K] and [L*R, N] row matrices (views; None unless both are contiguous that
        # way, as the layers store them): the dense method reads them on every call.
        a, b_t = self.lora_a, self.lora_b.transpose(1, 2)
        flat = None
        if a.is_contiguous() and b_t.is_contiguous():
            L, R, K = a.shape
            flat = (a.view(L * R, K), b_t.view(L * R, b_t.shape[2]))
        object.__setattr__(self, "flat", flat)

    @property
    def adapter_mask(self) -> int:
        return sum(1 << i for i, r in enumerate(self.rank_tuple) if r > 0)


@dataclass(frozen=True, eq=False)
class SharedShrink:
    """One layer's part in a shrink shared by the ``size`` layers of ``group`` that read the same input
    (q/k/v, gate/up): ``stacked_a`` ``[L, R_tot, K]`` is their A side by side, this layer's ``R`` columns
    start at ``offset``; ``member`` tells the layers apart."""

    group: object
    size: int
    member: int
    offset: int
    stacked_a: torch.Tensor


@dataclass(eq=False)
class _Pending:
    """A shared shrink computed for one input tensor, until every member of the group has used it."""

    x: torch.Tensor
    version: int
    shrunk: tuple[str, torch.Tensor]
    served: set = field(default_factory=set)


class LoRABatch:
    """One batch's selection prepared for the adapted layers: ``plan`` plus what is derived from it once.

    Build it with :func:`prepare_batch` (selection tensors) or ``LoRABatch(plan)`` (a prebuilt plan).
    ``host``: the PyTorch path's host data of the plan (None for plans on CUDA, where the Triton kernels
    read the plan on the device). ``sparse``: the batch of a layer that drops slots, whose tokens without
    an adapter cost nothing on the PyTorch path.
    """

    def __init__(self, plan: LoRAPlan, sparse: bool = False, root: LoRABatch | None = None):
        if not isinstance(plan, LoRAPlan):
            raise TypeError(f"plan must be a LoRAPlan (from build_plan), got {type(plan).__name__}")
        self.plan = plan
        self.sparse = sparse
        self.root = self if root is None else root  # the batch this one drops slots of (or itself)
        self.host = TorchPathCache(plan, sparse=sparse) if plan.device.type == "cpu" else None
        self._dropping: dict[tuple[int, ...], LoRABatch] = {}
        self._pending: dict[object, _Pending] = {}

    @property
    def keeps_dropped_slots(self) -> bool:
        """Whether :meth:`dropping` returns this batch itself (a small batch on the PyTorch path)."""
        return self.host is not None and self.plan.num_tokens < SPARSE_MIN_TOKENS

    def dropping(self, slots: DroppedSlots) -> LoRABatch:
        """This batch without ``slots`` (built once per ``slots.key``, kept in the batch).

        On the PyTorch path a batch of fewer than ``SPARSE_MIN_TOKENS`` tokens (decode steps) returns
        itself: there a layer's cost is the number of torch calls it makes, not the rows it computes, so
        the layer computes every row with its row weights (0 in the dropped slots: the same result) and
        keeps sharing its siblings' shrink, where a plan of its own would add calls to skip a few rows."""
        if self.keeps_dropped_slots:
            return self
        batch = self._dropping.get(slots.key)
        if batch is None:
            plan = self.plan
            ids = plan.seq_adapter.masked_fill(slots.dropped.to(plan.device), -1)
            sparse = build_plan(
                plan.seq_offsets, ids, plan.seq_weight, plan.num_adapters, num_tokens=plan.num_tokens
            )
            batch = self._dropping[slots.key] = LoRABatch(sparse, sparse=True, root=self)
        return batch

    def shared_shrink(self, share: SharedShrink, x: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """The shrink of ``x`` (a layer input ``[..., K]``) by ``share.stacked_a``, shared by the members
        of ``share.group``: computed by the first member called with ``x``, handed to the others called
        with that same tensor unchanged since, dropped once all have used it. None where the PyTorch
        path's grouped method serves the batch (each member then runs alone)."""
        group, member = share.group, share.member
        pending = self._pending.get(group)
        if (
            pending is None
            or pending.x is not x
            or pending.version != tensor_version(x)
            or member in pending.served
        ):
            if self.host is None:
                return None
            shrunk = shrink_shared(x.reshape(-1, x.shape[-1]), share.stacked_a, self.plan, self.host)
            if shrunk is None:
                self._pending.pop(group, None)
                return None
            pending = self._pending[group] = _Pending(x, tensor_version(x), shrunk)
        pending.served.add(member)
        if len(pending.served) == share.size:
            del self._pending[group]
        return pending.shrunk


def prepare_batch(
    seq_offsets: torch.Tensor,
    adapter_ids: torch.Tensor,
    adapter_weights: torch.Tensor,
    num_adapters: int,
    num_tokens: int | None = None,
) -> LoRABatch:
    """The :class:`LoRABatch` of selection tensors (the arguments of :func:`~dlplora_triton.build_plan`,
    trusted as they are: check user input with :func:`dlplora_triton.check_routing` first)."""
    return LoRABatch(
        build_plan(seq_offsets, adapter_ids, adapter_weights, num_adapters, num_tokens=num_tokens)
    )


# Renamed in 0.2: "route" now means the sentence router's decision only.
__getattr__ = moved_names(
    __name__,
    {
        "ModuleRoute": "dlplora_triton.batch:DroppedSlots",
    },
)
