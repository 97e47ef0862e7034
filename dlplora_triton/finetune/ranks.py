"""Rank operations on one :class:`DynamicLoRALinear`: grow, SVD shrink, and the optimizer state carried
through both (docs/dynamic-rank.md, "Reallocation"). Parameters keep their identity (:func:`swap_data`)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import DynamicLoRALinear, draw_a_rows

__all__ = ["set_rank", "grow_factors", "shrink_factors", "resize_state", "swap_data", "unwrap_optimizer"]

# Optimizer state entries that are linear in the gradient vs. in its square (docs/dynamic-rank.md).
_LINEAR_STATE = ("exp_avg", "momentum_buffer")
_SQUARED_STATE = ("exp_avg_sq", "max_exp_avg_sq")
_NULL_SV_RTOL = 1e-6  # singular values below this fraction of the largest carry nothing (fp32 noise)


def set_rank(
    layer: DynamicLoRALinear,
    rank: int,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None = None,
    path: str = "",
) -> None:
    """Give ``layer`` rank ``rank`` now (grow or shrink), resizing ``optimizer``'s state of its factors."""
    limit = min(layer.in_features, layer.out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank of {path!r} must be an int in [1, {limit}], got {rank!r}")
    old = layer.rank
    if rank == old:
        return
    A, B = layer.lora_A, layer.lora_B
    with torch.no_grad():
        if rank > old:
            new_a, new_b = grow_factors(A.detach(), B.detach(), rank, generator)
            maps = None
        else:
            new_a, new_b, maps = shrink_factors(A.detach(), B.detach(), rank, generator)
        if optimizer is not None:
            for p, kind in ((A, "A"), (B, "B")):
                state = optimizer.state.get(p)
                if state:
                    resize_state(p, state, kind, old, rank, maps)
        swap_data(A, new_a)
        swap_data(B, new_b)


def grow_factors(A: torch.Tensor, B: torch.Tensor, rank: int, generator: torch.Generator):
    """``(A [rank, K], B [N, rank])``: new rows of ``A`` drawn as PEFT draws them, zero columns of ``B``."""
    extra = rank - A.shape[0]
    rows = draw_a_rows(extra, A.shape[1], generator).to(A.device, A.dtype)
    new_a = torch.cat([A, rows], dim=0)
    new_b = torch.cat([B, torch.zeros(B.shape[0], extra, device=B.device, dtype=B.dtype)], dim=1)
    return new_a, new_b


def shrink_factors(A: torch.Tensor, B: torch.Tensor, rank: int, generator: torch.Generator):
    """Best rank-``rank`` approximation of ``B A`` in balanced factors, and the maps for the moments."""
    a = A.detach().double()
    b = B.detach().double()
    # SVD of B A [N, K] through the r x r core: B = Qb Rb, A^T = Qa Ra, B A = Qb (Rb Ra^T) Qa^T.
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u_c, s, vh_c = torch.linalg.svd(rb @ ra.T)
    u = qb @ u_c[:, :rank]
    v = qa @ vh_c[:rank].T
    root = s[:rank].sqrt()
    new_b = u * root
    new_a = root[:, None] * v.T
    # Components that carry nothing (zero singular value) would get zero A and B, and a zero pair gets
    # no gradient: re-draw their A rows, keep their B columns zero (B A does not change).
    null = s[:rank] <= _NULL_SV_RTOL * float(s[0])  # all of them when B A = 0
    if bool(null.any()):
        fresh = draw_a_rows(int(null.sum()), a.shape[1], generator).double()
        new_a[null] = fresh
        new_b[:, null] = 0.0
    # Moment maps: A' = T_A A and B' = B T_B (rows / columns of the kept singular vectors lie in the
    # row space of A / column space of B). rtol drops directions A or B barely span, rather than
    # amplifying their moments.
    t_a = (root[:, None] * v.T) @ torch.linalg.pinv(a, rtol=1e-6)  # [rank, old]
    t_b = torch.linalg.pinv(b, rtol=1e-6) @ (u * root)  # [old, rank]
    t_a[null] = 0.0
    t_b[:, null] = 0.0
    maps = {"t_a": t_a, "t_b": t_b, "null": null}
    return new_a.to(A.dtype), new_b.to(B.dtype), maps


def resize_state(p: nn.Parameter, state: dict, kind: str, old: int, rank: int, maps: dict | None) -> None:
    """Resize one parameter's optimizer state for ``old -> rank`` (docs/dynamic-rank.md)."""
    for key, value in list(state.items()):
        if not isinstance(value, torch.Tensor) or value.shape != p.shape:
            continue  # scalars such as Adam's step count stay
        if key not in _LINEAR_STATE and key not in _SQUARED_STATE:
            raise ValueError(
                f"optimizer state {key!r} of shape {list(value.shape)} cannot be carried through a rank change; "
                f"DynamicLoRA knows {_LINEAR_STATE + _SQUARED_STATE} (Adam, AdamW, SGD)"
            )
        squared = key in _SQUARED_STATE
        v = value.double()
        if maps is None:  # grow: append rows of A / columns of B
            extra = rank - old
            if kind == "A":
                fill = v.mean(0, keepdim=True) if squared else torch.zeros_like(v[:1])
                new = torch.cat([v, fill.expand(extra, -1)], dim=0)
            else:
                fill = v.mean(1, keepdim=True) if squared else torch.zeros_like(v[:, :1])
                new = torch.cat([v, fill.expand(-1, extra)], dim=1)
        else:  # shrink: change of basis
            null = maps["null"]
            if kind == "A":  # A' = T_A A, so grad B' = grad B T_A^T and grad A' = T_B^T grad A
                t = maps["t_b"].T
                new = (t * t) @ v if squared else t @ v
                if squared and bool(null.any()):
                    new[null] = v.mean(0, keepdim=True).expand(int(null.sum()), -1)
            else:
                t = maps["t_a"].T
                new = v @ (t * t) if squared else v @ t
                if squared and bool(null.any()):
                    new[:, null] = v.mean(1, keepdim=True).expand(-1, int(null.sum()))
        state[key] = new.to(value.dtype).contiguous()


def swap_data(p: nn.Parameter, new: torch.Tensor) -> None:
    """Give parameter ``p`` the tensor ``new`` (any shape), keeping the Python object.

    The optimizer's param groups and state stay keyed by the same object. ``p.data = new`` is not enough:
    a graph still alive from the last step (a ``loss`` variable held until the next forward) keeps
    ``p``'s gradient accumulator, which remembers the old shape and fails the next backward.
    ``swap_tensors`` gives ``p`` fresh autograd metadata (and no ``.grad``). ``new`` is made contiguous:
    the SVD factors come out column-major, and fused AdamW pairs a parameter with its (contiguous) state
    element by element in memory order, so a transposed layout would mix up their entries.
    """
    with torch.no_grad():
        torch.utils.swap_tensors(p, nn.Parameter(new.contiguous(), requires_grad=p.requires_grad))


def unwrap_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}"
        )
    return optimizer
