"""Input checks of the kernel-level API: shapes, dtypes, devices and routing values.

Shared by :mod:`dlplora_triton.ops` (``fused_lora``, ``fused_lora_planned``) and
:mod:`dlplora_triton.selection`; the errors name the argument that is wrong.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "DTypeError", "check_routing"]

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
    """Raise ValueError / TypeError naming the problem if the selection tensors break the contract (the name check_routing is the public contract's).

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
