"""Random inputs for fused_lora tests: one factory shared by the kernel, property and GPU tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Case:
    """Shape of one fused_lora test batch; ids readable in pytest output."""

    name: str
    seq_lens: list[int]
    P: int
    L: int
    K: int
    N: int
    R: int
    ranks: list[int] | None = None  # None: all R
    empty_slot_frac: float = 0.25
    shared_adapter: int | None = None  # every sequence's first slot uses this adapter
    repeat_in_row: bool = False  # duplicate an id within a row (adds twice)

    def __str__(self) -> str:
        return self.name


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> dict:
    """Random x, A, B, routing, ranks and scales (never zeros, signs mixed) for ``case``."""
    g = torch.Generator().manual_seed(seed)
    S, P, L = len(case.seq_lens), case.P, case.L
    T = sum(case.seq_lens)
    offsets = torch.zeros(S + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(case.seq_lens, dtype=torch.int64), 0)
    ids = torch.randint(0, L, (S, P), generator=g)
    ids[torch.rand(S, P, generator=g) < case.empty_slot_frac] = -1
    if case.shared_adapter is not None:
        ids[:, 0] = case.shared_adapter
    if case.repeat_in_row and P > 1:
        ids[0, 1] = ids[0, 0] = max(int(ids[0, 0]), 0)
    weights = torch.randn(S, P, generator=g)
    ranks = None if case.ranks is None else torch.tensor(case.ranks)
    # Scale A by 1/sqrt(K) so the delta has unit-ish size at any K (fp16 stays in range).
    x = torch.randn(T, case.K, generator=g)
    a = torch.randn(L, case.R, case.K, generator=g) / case.K**0.5
    b = torch.randn(L, case.N, case.R, generator=g) / case.R**0.5
    scales = torch.rand(L, generator=g) + 0.5
    return {
        "x": x.to(device, dtype),
        "lora_a": a.to(device, dtype),
        "lora_b": b.to(device, dtype),
        "seq_offsets": offsets.to(device),
        "adapter_ids": ids.to(device),
        "adapter_weights": weights.to(device),
        "ranks": None if ranks is None else ranks.to(device),
        "scales": scales.to(device),
    }


def reference_delta(inputs: dict) -> torch.Tensor:
    """The float64 oracle of ``inputs`` (inputs cast up after their own rounding)."""
    from dlplora_triton import fused_lora_reference

    d = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    return fused_lora_reference(
        d["x"],
        d["lora_a"],
        d["lora_b"],
        d["seq_offsets"].cpu(),
        d["adapter_ids"].cpu(),
        d["adapter_weights"],
        d["ranks"],
        d["scales"],
    )


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(y.device)
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
