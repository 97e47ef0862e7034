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

import os
from collections.abc import Sequence

import torch

from .backends.grad import factor_grads
from .backends.torch_path import (
    TorchPathCache,
    dense_layer_delta,
    expand_shared,
    fused_lora_torch,
    shrink_shared,
    token_weights,
)
from .plan import LoRAPlan, build_plan, plan_from_args, plan_to_args

__all__ = [
    "fused_lora",
    "fused_lora_planned",
    "shrink_shared",
    "expand_shared",
    "dense_layer_delta",
    "check_routing",
    "workspace_bytes",
    "DTypeError",
    "BACKENDS",
]

BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class DTypeError(TypeError, ValueError):
    """A tensor of the wrong dtype. Both a TypeError and a ValueError, so either catch works."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and not _interpreting():
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            f"to run the kernels on {x.device.type} tensors in the interpreter"
        )
    if backend == "triton" and x.dtype not in _TRITON_DTYPES:
        raise DTypeError(f"backend='triton' takes float16, bfloat16 or float32 inputs, got x of {x.dtype}")
    return backend


def _as_tensor(value, name: str, length: int, kind: str, device: torch.device) -> torch.Tensor | None:
    """ranks / scales: None, or a length-L sequence or tensor of ints ('int') / floats ('float')."""
    if value is None:
        return None
    t = torch.as_tensor(value, device=device)
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape [L] = [{length}], got {list(t.shape)}")
    if kind == "int" and (t.is_floating_point() or t.is_complex()):
        raise DTypeError(f"{name} must hold integers, got {t.dtype}")
    if kind == "float" and not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise DTypeError(f"{name} must hold real numbers, got {t.dtype}")
    return t


def _check_shapes(x, lora_a, lora_b, out):
    """Shape, dtype and device checks that need no host sync; returns (T, K, L, R, N)."""
    for name, t in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise DTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, K], got shape {list(x.shape)}")
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a must be [L, R, K], got shape {list(lora_a.shape)}")
    if lora_b.dim() != 3:
        raise ValueError(f"lora_b must be [L, N, R], got shape {list(lora_b.shape)}")
    T, K = x.shape
    L, R, K_a = lora_a.shape
    L_b, N, R_b = lora_b.shape
    if K_a != K:
        raise ValueError(f"lora_a is [L, R, K] = {list(lora_a.shape)} but x has K = {K}")
    if (L_b, R_b) != (L, R):
        raise ValueError(f"lora_b is [L, N, R] = {list(lora_b.shape)} but lora_a has L = {L}, R = {R}")
    if lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        raise DTypeError(
            f"x, lora_a and lora_b must share a dtype, got {x.dtype}, {lora_a.dtype}, {lora_b.dtype}"
        )
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("out", out)):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != (T, N):
            raise ValueError(f"out must be [T, N] = [{T}, {N}], got {list(out.shape)}")
        if out.dtype != x.dtype:
            raise DTypeError(f"out must have x's dtype {x.dtype}, got {out.dtype}")
    return T, K, L, R, N


def check_routing(
    seq_offsets: torch.Tensor,
    adapter_ids: torch.Tensor,
    adapter_weights: torch.Tensor,
    num_adapters: int,
    num_tokens: int,
) -> None:
    """Raise ValueError / TypeError naming the problem if the routing tensors break the contract.

    Reads values back to the host: call it where inputs come from users, not on the hot path.
    """
    for name, t in (
        ("seq_offsets", seq_offsets),
        ("adapter_ids", adapter_ids),
        ("adapter_weights", adapter_weights),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if seq_offsets.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"seq_offsets must be int32 or int64, got {seq_offsets.dtype}")
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if not adapter_weights.is_floating_point():
        raise DTypeError(f"adapter_weights must be floating point, got {adapter_weights.dtype}")
    if adapter_ids.dim() != 2:
        raise ValueError(f"adapter_ids must be [S, P], got shape {list(adapter_ids.shape)}")
    S, P = adapter_ids.shape
    if adapter_weights.shape != adapter_ids.shape:
        raise ValueError(
            f"adapter_weights must match adapter_ids [S, P] = [{S}, {P}], got {list(adapter_weights.shape)}"
        )
    if seq_offsets.shape != (S + 1,):
        raise ValueError(
            f"seq_offsets must be [S+1] = [{S + 1}] for {S} sequences, got {list(seq_offsets.shape)}"
        )
    for name, t in (("adapter_ids", adapter_ids), ("adapter_weights", adapter_weights)):
        if t.device != seq_offsets.device:
            raise ValueError(f"{name} is on {t.device} but seq_offsets is on {seq_offsets.device}")
    offsets = seq_offsets.tolist()
    if offsets[0] != 0:
        raise ValueError(f"seq_offsets[0] must be 0, got {offsets[0]}")
    if offsets[-1] != num_tokens:
        raise ValueError(
            f"seq_offsets[-1] must equal the number of tokens T = {num_tokens}, got {offsets[-1]}"
        )
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"seq_offsets must be non-decreasing, got {offsets}")
    if adapter_ids.numel():
        lo, hi = int(adapter_ids.min()), int(adapter_ids.max())
        if lo < -1 or hi >= num_adapters:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"adapter_ids must lie in -1..{num_adapters - 1} (L = {num_adapters}), got {bad}"
            )
    if not bool(torch.isfinite(adapter_weights).all()):
        raise ValueError("adapter_weights must be finite (found NaN or inf)")


def _check_ranks_scales(ranks: torch.Tensor | None, scales: torch.Tensor | None, R: int) -> None:
    if ranks is not None and ranks.numel():
        lo, hi = int(ranks.min()), int(ranks.max())
        if lo < 0 or hi > R:
            raise ValueError(f"ranks must lie in 0..R = 0..{R}, got {lo if lo < 0 else hi}")
    if scales is not None and not bool(torch.isfinite(scales.float()).all()):
        raise ValueError("scales must be finite (found NaN or inf)")


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
    plan: LoRAPlan,
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
    (same grouping). ``cache``: the PyTorch path's :class:`TorchPathCache` of ``plan``, shared by the
    layers of a forward pass (None: host data is read again on this call).
    """
    T, K, L, R, N = _check_shapes(x, lora_a, lora_b, out)
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
