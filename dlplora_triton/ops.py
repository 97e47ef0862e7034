"""``fused_lora``: validation, plan building, backend dispatch and the ``torch.library`` op.

Two forms:

- :func:`fused_lora` (the public contract): tensors in, tensors out; validates everything, builds a
  plan, runs. Registered as the custom op ``dlplora_triton::fused_lora_`` so ``torch.compile``
  traces a model calling it without graph breaks.
- :func:`fused_lora_planned` (the hot path): takes a :class:`~dlplora_triton.plan.LoRAPlan` built
  once per forward pass by :func:`~dlplora_triton.plan.build_plan` and shared by every layer. It
  checks shapes only (no host sync), so it can run inside CUDA-graph capture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._moved import moved_names
from .backends import torch_path as _torch_path
from .backends.grad import factor_grads
from .backends.torch_path import TorchPathCache, fused_lora_torch, token_weights
from .batch import DroppedSlots, LoRABatch, LoRAStacks, SharedShrink, prepare_batch
from .checks import (
    BACKENDS,
    DTypeError,
    _as_tensor,
    _check_ranks_scales,
    _check_shapes,
    _resolve_backend,
    check_routing,
)
from .plan import LoRAPlan, build_plan, plan_from_args, plan_to_args

__all__ = [
    "fused_lora",
    "fused_lora_planned",
    "prepare_batch",
    "add_layer_delta",
    "LoRABatch",
    "LoRAStacks",
    "DroppedSlots",
    "SharedShrink",
    "check_routing",
    "workspace_bytes",
    "DTypeError",
    "BACKENDS",
]


def _run(
    x, lora_a, lora_b, plan: LoRAPlan, ranks, scales, out, backend: str, cache=None, adapter_weights=None
) -> None:
    """Add the delta into out with the resolved backend (inputs already checked)."""
    if plan.num_tokens == 0 or plan.num_slots == 0 or out.shape[1] == 0:
        return
    if backend == "torch":
        fused_lora_torch(
            x, lora_a, lora_b, plan, out, ranks, scales, cache=cache, adapter_weights=adapter_weights
        )
        return
    # Imported here so TRITON_INTERPRET set after `import dlplora_triton` still takes effect.
    from dlplora_triton.kernels import expand_config, lora_expand_launch, lora_shrink_launch, shrink_config

    _, R, K = lora_a.shape
    N = lora_b.shape[1]
    ranks32 = None if ranks is None else ranks.to(torch.int32)
    scales32 = None if scales is None else scales.to(torch.float32)
    s_cfg = shrink_config(plan.shrink_tile_start.shape[0], K, R, x.dtype)
    e_cfg = expand_config(plan.expand_tile_count.shape[0], N, R, x.dtype)
    v = torch.empty(
        s_cfg["SPLIT_K"], plan.num_tokens * plan.num_slots, R, device=x.device, dtype=torch.float32
    )
    lora_shrink_launch(
        x,
        lora_a,
        v,
        plan.sorted_rows,
        plan.shrink_tile_adapter,
        plan.shrink_tile_start,
        plan.shrink_tile_end,
        token_weights(plan, adapter_weights)[1].reshape(-1),
        ranks32,
        scales32,
        plan.num_slots,
        plan.shrink_block_m,
        s_cfg,
    )
    lora_expand_launch(
        v,
        lora_b,
        out,
        plan.token_adapter,
        plan.expand_tile_count,
        plan.expand_tile_adapters,
        ranks32,
        plan.expand_block_m,
        e_cfg,
    )


def workspace_bytes(plan: LoRAPlan, lora_a: torch.Tensor, backend: str = "triton") -> int:
    """Bytes the Triton kernels allocate per call for this plan and layer (the fp32 shrink output).

    The plan itself holds ``plan.nbytes``; the PyTorch path's temporaries are those of its matmuls.
    """
    if backend != "triton":
        raise ValueError(f"workspace_bytes covers the Triton kernels only, got backend={backend!r}")
    from dlplora_triton.kernels import shrink_config

    _, R, K = lora_a.shape
    split_k = shrink_config(plan.shrink_tile_start.shape[0], K, R, lora_a.dtype)["SPLIT_K"]
    return split_k * plan.num_tokens * plan.num_slots * R * 4


def fused_lora_planned(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan | LoRABatch,
    ranks: torch.Tensor | Sequence[int] | None = None,
    scales: torch.Tensor | Sequence[float] | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    adapter_weights: torch.Tensor | None = None,
    cache: TorchPathCache | None = None,
) -> torch.Tensor:
    """The fused LoRA delta of one layer with a prebuilt plan (the hot path of a model forward).

    Same semantics as :func:`fused_lora`, with the routing taken from ``plan`` (build it once per
    forward pass with :func:`dlplora_triton.build_plan` and pass it to every layer). Only shapes are
    checked here, so nothing syncs with the device; ranks and scales are trusted to be in range.

    ``adapter_weights``: optional ``[S, P]`` float fusion weights replacing the plan's for this call
    (same grouping). ``plan`` may be a :class:`~dlplora_triton.batch.LoRABatch`: its plan then runs with
    the batch's host data, read once for every layer of the batch (``cache``: the PyTorch path's cache
    of a bare plan; None: host data is read again on this call).
    """
    T, K, L, R, N = _check_shapes(x, lora_a, lora_b, out)
    if isinstance(plan, LoRABatch):
        plan, cache = plan.plan, plan.host if cache is None else cache
    if not isinstance(plan, LoRAPlan):
        raise TypeError(f"plan must be a LoRAPlan (from build_plan), got {type(plan).__name__}")
    if plan.num_tokens != T:
        raise ValueError(f"the plan was built for T = {plan.num_tokens} tokens but x has {T}")
    if plan.num_adapters != L:
        raise ValueError(f"the plan was built for L = {plan.num_adapters} adapters but lora_a stacks {L}")
    if plan.device != x.device:
        raise ValueError(f"the plan is on {plan.device} but x is on {x.device}")
    if adapter_weights is not None:
        if not isinstance(adapter_weights, torch.Tensor) or not adapter_weights.is_floating_point():
            raise TypeError("adapter_weights must be a floating-point tensor [S, P]")
        if adapter_weights.shape != plan.seq_adapter.shape:
            raise ValueError(
                f"adapter_weights must be [S, P] = {list(plan.seq_adapter.shape)} like the plan's routing, "
                f"got {list(adapter_weights.shape)}"
            )
        if adapter_weights.device != x.device:
            raise ValueError(f"adapter_weights is on {adapter_weights.device} but x is on {x.device}")
    backend = _resolve_backend(backend, x)
    ranks = _as_tensor(ranks, "ranks", L, "int", x.device)
    scales = _as_tensor(scales, "scales", L, "float", x.device)
    if out is None:
        out = torch.zeros(T, N, dtype=x.dtype, device=x.device)
    compiling = torch.compiler.is_compiling()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_a, lora_b, scales, adapter_weights)
    )
    if not compiling and (backend == "torch" or not needs_grad):
        # Eager: the PyTorch path's tensor ops are recorded by autograd as they run, and the Triton
        # kernels without grad need no op dispatch (which would only add host time per layer).
        _run(x, lora_a, lora_b, plan, ranks, scales, out, backend, cache, adapter_weights)
        return out
    tensors, sizes = plan_to_args(plan)
    if scales is not None and not scales.is_floating_point():
        scales = scales.to(torch.float32)
    if needs_grad:
        delta = torch.ops.dlplora_triton.fused_lora_planned_delta(
            x, lora_a, lora_b, tensors, sizes, ranks, scales, adapter_weights, backend
        )
        return out.add_(delta)
    torch.ops.dlplora_triton.fused_lora_planned_(
        out, x, lora_a, lora_b, tensors, sizes, ranks, scales, adapter_weights, backend
    )
    return out


def add_layer_delta(
    x: torch.Tensor,
    out: torch.Tensor,
    stacks: LoRAStacks,
    batch: LoRABatch,
    row_weights: torch.Tensor | None = None,
    backend: str = "auto",
    share: SharedShrink | None = None,
) -> None:
    """Add one adapted layer's LoRA delta for ``batch`` into ``out`` in place (the layers' one call).

    ``x`` ``[..., K]`` and ``out`` ``[..., N]`` (contiguous) hold the batch's ``T`` tokens;
    ``row_weights``: ``[S, P]`` fusion weights replacing the plan's in this layer (MiLoRA's gated
    weights), or None; ``share``: the layer's part in a shrink shared with its siblings, or None.

    Picks the cheapest exact path: on CPU tensors (eager, not ``backend="triton"``) the shared shrink,
    then the PyTorch path's dense method with coefficients kept in ``batch`` for every layer of the same
    rank and scale pattern; otherwise :func:`fused_lora_planned` (Triton on CUDA, custom ops under
    ``torch.compile`` and for gradients). Every path gives the same result.
    """
    K, N = stacks.lora_a.shape[2], stacks.lora_b.shape[1]
    host = batch.host
    eager_cpu = (
        host is not None and not x.is_cuda and backend != "triton" and not torch.compiler.is_compiling()
    )
    out2 = out.view(-1, N)
    if eager_cpu and share is not None:
        shrunk = batch.shared_shrink(share, x)
        if shrunk is not None:
            _torch_path.expand_shared(
                shrunk,
                share.offset,
                stacks.lora_b,
                batch.plan,
                host,
                out2,
                stacks.scales,
                row_weights,
                stacks.scale_tuple,
            )
            return
    x2 = x.reshape(-1, K)
    trusted_weights = row_weights is None or not (row_weights.requires_grad and torch.is_grad_enabled())
    flat = stacks.flat
    if eager_cpu and share is None and trusted_weights and flat is not None and x.dtype == flat[0].dtype:
        plan = batch.plan
        if x2.shape[0] == plan.num_tokens and plan.num_adapters == len(stacks.rank_tuple):
            if _torch_path.dense_layer_delta(
                x2, *flat, host, out2, stacks.rank_tuple, stacks.scale_tuple, row_weights
            ):
                return
    # ranks / scales as tensors: fused_lora_planned takes them as they are on every backend.
    fused_lora_planned(
        x2,
        stacks.lora_a,
        stacks.lora_b,
        batch.plan,
        ranks=stacks.ranks,
        scales=stacks.scales,
        out=out2,
        backend=backend,
        adapter_weights=row_weights,
        cache=host,
    )


# The planned call as custom ops, so torch.compile sees one opaque node per layer (the PyTorch path's
# method choice reads values on the host, which dynamo cannot trace) and autograd has a formula for
# the Triton kernels: `fused_lora_planned_` adds into `out` (inference), `fused_lora_planned_delta`
# returns the delta and has a backward (used when an input requires grad).


@torch.library.custom_op("dlplora_triton::fused_lora_planned_", mutates_args=("out",))
def _planned_op(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan_tensors: list[torch.Tensor],
    plan_sizes: list[int],
    ranks: torch.Tensor | None,
    scales: torch.Tensor | None,
    adapter_weights: torch.Tensor | None,
    backend: str,
) -> None:
    plan = plan_from_args(plan_tensors, plan_sizes)
    _run(x, lora_a, lora_b, plan, ranks, scales, out, backend, None, adapter_weights)


@_planned_op.register_fake
def _(out, x, lora_a, lora_b, plan_tensors, plan_sizes, ranks, scales, adapter_weights, backend) -> None:
    return None


@torch.library.custom_op("dlplora_triton::fused_lora_planned_delta", mutates_args=())
def _planned_delta_op(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan_tensors: list[torch.Tensor],
    plan_sizes: list[int],
    ranks: torch.Tensor | None,
    scales: torch.Tensor | None,
    adapter_weights: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype, device=x.device)
    _run(
        x,
        lora_a,
        lora_b,
        plan_from_args(plan_tensors, plan_sizes),
        ranks,
        scales,
        out,
        backend,
        None,
        adapter_weights,
    )
    return out


@_planned_delta_op.register_fake
def _(x, lora_a, lora_b, plan_tensors, plan_sizes, ranks, scales, adapter_weights, backend) -> torch.Tensor:
    return x.new_empty(x.shape[0], lora_b.shape[1])


def _planned_setup(ctx, inputs, output) -> None:
    x, lora_a, lora_b, plan_tensors, plan_sizes, ranks, scales, adapter_weights, backend = inputs
    if any(t.requires_grad for t in plan_tensors):
        raise ValueError(
            "the plan's tensors require grad (a plan built from weights that do): build the plan from "
            "detached weights and pass the trainable ones as adapter_weights=, whose gradient is supported"
        )
    ctx.save_for_backward(x, lora_a, lora_b, ranks, scales, adapter_weights, *plan_tensors)
    ctx.plan_sizes, ctx.backend = plan_sizes, backend


def _planned_backward(ctx, dy):
    x, lora_a, lora_b, ranks, scales, adapter_weights, *plan_tensors = ctx.saved_tensors
    plan = plan_from_args(plan_tensors, ctx.plan_sizes)
    need_x, need_a, need_b, _, _, _, need_s, need_w, _ = ctx.needs_input_grad
    dx = None
    if need_x:
        # dx[t] = sum_p c (dy[t] B_i) A_i: the same op with B^T as the stacked "A" and A^T as "B".
        dx = torch.ops.dlplora_triton.fused_lora_planned_delta(
            dy.contiguous(),
            lora_b.transpose(1, 2),
            lora_a.transpose(1, 2),
            plan_tensors,
            ctx.plan_sizes,
            ranks,
            scales,
            adapter_weights,
            ctx.backend,
        )
    d_a, d_b, d_w, d_s = factor_grads(
        dy, x, lora_a, lora_b, plan, ranks, scales, adapter_weights, (need_a, need_b, need_w, need_s)
    )
    return dx, d_a, d_b, [None] * len(plan_tensors), None, None, d_s, d_w, None


_planned_delta_op.register_autograd(_planned_backward, setup_context=_planned_setup)


@torch.library.custom_op("dlplora_triton::fused_lora_", mutates_args=("out",))
def _fused_lora_op(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seq_offsets: torch.Tensor,
    adapter_ids: torch.Tensor,
    adapter_weights: torch.Tensor,
    ranks: torch.Tensor | None,
    scales: torch.Tensor | None,
    backend: str,
) -> None:
    # Value checks (host syncs) live inside the op, out of torch.compile's sight.
    L, R = lora_a.shape[:2]
    check_routing(seq_offsets, adapter_ids, adapter_weights, L, x.shape[0])
    _check_ranks_scales(ranks, scales, R)
    plan = build_plan(seq_offsets, adapter_ids, adapter_weights, L, num_tokens=x.shape[0])
    _run(x, lora_a, lora_b, plan, ranks, scales, out, backend)


@_fused_lora_op.register_fake
def _(out, x, lora_a, lora_b, seq_offsets, adapter_ids, adapter_weights, ranks, scales, backend) -> None:
    return None


def fused_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seq_offsets: torch.Tensor,
    adapter_ids: torch.Tensor,
    adapter_weights: torch.Tensor,
    ranks: torch.Tensor | Sequence[int] | None = None,
    scales: torch.Tensor | Sequence[float] | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Apply each sequence's weighted mix of LoRA adapters to its tokens, in one call.

    Args:
        x: ``[T, K]`` tokens of all sequences, concatenated (float16, bfloat16 or float32).
        lora_a: ``[L, R, K]`` stacked A of ``L`` adapters (``R`` = max rank), x's dtype.
        lora_b: ``[L, N, R]`` stacked B, x's dtype.
        seq_offsets: ``[S+1]`` int32/int64; sequence ``s`` owns tokens ``seq_offsets[s]:seq_offsets[s+1]``;
            starts at 0, non-decreasing, ends at ``T``.
        adapter_ids: ``[S, P]`` int32/int64 adapters of each sequence, ``-1`` = empty slot.
        adapter_weights: ``[S, P]`` float fusion weights, any finite reals.
        ranks: ``[L]`` int in ``0..R``, default ``R``: adapter ``i`` uses ``lora_a[i, :ranks[i]]`` and
            ``lora_b[i, :, :ranks[i]]``; what lies beyond is ignored (0: contributes nothing).
        scales: ``[L]`` float, default ones (PEFT: ``lora_alpha / r``).
        out: ``[T, N]`` in x's dtype: when given, the delta is added into it in place and it is returned.
        backend: ``"auto"`` (Triton on CUDA tensors, PyTorch on CPU), ``"triton"`` or ``"torch"``.

    Returns:
        ``[T, N]`` in x's dtype: ``out`` plus the delta, or (without ``out``) the LoRA delta alone.

    Semantics::

        for s in range(S):
            for p in range(P):
                i = adapter_ids[s, p]
                if i < 0: continue
                t = slice(seq_offsets[s], seq_offsets[s + 1])
                y[t] += adapter_weights[s, p] * scales[i] * (x[t] @ lora_a[i, :ranks[i]].T) @ lora_b[i, :, :ranks[i]].T

    Example::

        x = torch.randn(5, 64); a = torch.randn(3, 8, 64); b = torch.randn(3, 32, 8)
        offsets = torch.tensor([0, 2, 5])                      # two sequences: 2 and 3 tokens
        ids = torch.tensor([[0, 2], [1, -1]])                  # seq 0 mixes adapters 0 and 2
        weights = torch.tensor([[0.7, 0.3], [1.0, 0.0]])
        delta = fused_lora(x, a, b, offsets, ids, weights)     # [5, 32]

    Raises ValueError / TypeError naming the problem for bad shapes, dtypes, devices, ids out of
    range, weights that are not finite, offsets that are not monotone or do not end at ``T``.
    """
    T, K, L, R, N = _check_shapes(x, lora_a, lora_b, out)
    backend = _resolve_backend(backend, x)
    ranks = _as_tensor(ranks, "ranks", L, "int", x.device)
    scales = _as_tensor(scales, "scales", L, "float", x.device)
    for name, t in (
        ("seq_offsets", seq_offsets),
        ("adapter_ids", adapter_ids),
        ("adapter_weights", adapter_weights),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if out is None:
        out = torch.zeros(T, N, dtype=x.dtype, device=x.device)
    if scales is not None and not scales.is_floating_point():
        scales = scales.to(torch.float32)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_a, lora_b, scales, adapter_weights)
    ):
        # Gradients: through the planned form, which has a backward on both backends; the plan is
        # built from detached weights and the live ones are passed per call.
        if not torch.compiler.is_compiling():
            check_routing(seq_offsets, adapter_ids, adapter_weights, L, T)
            _check_ranks_scales(ranks, scales, R)
        plan = build_plan(seq_offsets, adapter_ids, adapter_weights.detach(), L, num_tokens=T)
        weights = adapter_weights if adapter_weights.requires_grad else None
        return fused_lora_planned(
            x, lora_a, lora_b, plan, ranks, scales, out, backend, adapter_weights=weights
        )
    torch.ops.dlplora_triton.fused_lora_(
        out, x, lora_a, lora_b, seq_offsets, adapter_ids, adapter_weights, ranks, scales, backend
    )
    return out


# Moved in 0.2: the layers make one add_layer_delta call on a prepared batch; DroppedSlots was ModuleRoute.
__getattr__ = moved_names(
    __name__,
    {
        "shrink_shared": "dlplora_triton.backends.torch_path:shrink_shared",
        "expand_shared": "dlplora_triton.backends.torch_path:expand_shared",
        "dense_layer_delta": "dlplora_triton.backends.torch_path:dense_layer_delta",
        "ModuleRoute": "dlplora_triton.batch:DroppedSlots",
    },
)
