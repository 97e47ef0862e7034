"""The fine-tuning layers: :class:`DynamicLoRALinear` (a LoRA whose rank may change) and its
:class:`InputGate` (docs/dynamic-rank.md, "Input gate")."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DynamicLoRALinear", "InputGate", "draw_a_rows"]


class InputGate(nn.Module):
    """Per-token gate ``g(x) = 2 sigmoid(u.x/(rms(x) sqrt(K)) + c log rms(x) + b)``, ``[..., K] -> [..., 1]``.

    ``u``, ``c``, ``b`` start at 0 (``g = 1``). Computed in float32 whatever the input dtype.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.u = nn.Parameter(torch.zeros(in_features))
        self.c = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ms = xf.pow(2).mean(-1, keepdim=True) + 1e-6
        rms = ms.sqrt()
        z = (
            (xf @ self.u.float()).unsqueeze(-1) / (rms * math.sqrt(self.in_features))
            + self.c * 0.5 * ms.log()
            + self.b
        )
        return 2.0 * torch.sigmoid(z)


class DynamicLoRALinear(nn.Module):
    """``y = base(x) + scale * g(x) * (x A^T) B^T`` with a rank that :class:`DynamicLoRA` may change.

    ``base`` is the original ``nn.Linear`` (frozen, kept as the child ``base``); ``lora_A [r, K]``,
    ``lora_B [N, r]`` are float32 (as PEFT keeps adapters of half-precision models); ``input_gate`` is an
    :class:`InputGate` or None. The product is computed in the order PEFT computes it, so the exported
    adapter reproduces the gate-off output.
    """

    def __init__(
        self, base: nn.Linear, rank: int, scale: float, input_gate: bool, generator: torch.Generator
    ):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.lora_A = nn.Parameter(draw_a_rows(rank, self.in_features, generator).to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.scale = float(scale)
        self.input_gate = InputGate(self.in_features).to(device) if input_gate else None
        self.gate_enabled = True

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        if self.input_gate is not None and self.gate_enabled:
            h = h * self.input_gate(x).to(h.dtype)
        return y + h.to(y.dtype)

    def extra_repr(self) -> str:
        gate = ", input_gate" if self.input_gate is not None else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}{gate}"


def draw_a_rows(rows: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of ``A`` drawn as PEFT initialises ``lora_A`` (Kaiming-uniform, a = sqrt(5): U(+-1/sqrt(K)))."""
    out = torch.empty(rows, in_features)
    if rows:
        nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)
    return out
