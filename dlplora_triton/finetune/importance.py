"""When ranks move and toward which modules: :class:`RankSchedule`, the smoothed importance scores and
the (donor, receiver) pairs of a reallocation (docs/dynamic-rank.md, "Importance", "Schedule")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..defaults import IMPORTANCE_KINDS
from .layers import DynamicLoRALinear

__all__ = ["RankSchedule", "Importance", "plan_moves", "IMPORTANCE_KINDS"]


class RankSchedule:
    """When ranks move, counted in optimizer steps ``t = 1..total_steps``.

    Reallocation happens after step ``t`` iff ``warmup_steps < t <= total_steps - final_steps`` and
    ``(t - warmup_steps) % interval == 0``. Defaults: warm-up 10% of the steps, final phase 25%.
    """

    def __init__(
        self, total_steps: int, interval: int, warmup_steps: int | None = None, final_steps: int | None = None
    ):
        if not _is_int(total_steps) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not _is_int(interval) or interval <= 0:
            raise ValueError(
                f"interval (steps between reallocations) must be a positive int, got {interval!r}"
            )
        warmup_steps = round(0.10 * total_steps) if warmup_steps is None else warmup_steps
        final_steps = round(0.25 * total_steps) if final_steps is None else final_steps
        for name, value in (("warmup_steps", warmup_steps), ("final_steps", final_steps)):
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if warmup_steps + final_steps >= total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) + final_steps ({final_steps}) must be below total_steps "
                f"({total_steps}): the schedule leaves no step where ranks can move"
            )
        self.total_steps, self.interval = int(total_steps), int(interval)
        self.warmup_steps, self.final_steps = int(warmup_steps), int(final_steps)

    def reallocates_at(self, step: int) -> bool:
        """Whether ranks move right after optimizer step ``step`` (1-based)."""
        return (
            self.warmup_steps < step <= self.total_steps - self.final_steps
            and (step - self.warmup_steps) % self.interval == 0
        )

    def as_dict(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "interval": self.interval,
            "warmup_steps": self.warmup_steps,
            "final_steps": self.final_steps,
        }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Importance:
    """Per-module importance smoothed as AdaLoRA does: ``I_bar`` (``ipt``) and ``U_bar`` (``unc``), ``[n]``
    float64. ``kind``: ``"sensitivity"`` (``I = sum |w * grad w| / r``, score ``I_bar * U_bar``) or
    ``"grad_norm"`` (``I = (||grad A||^2 + ||grad B||^2) / r``, score ``I_bar``)."""

    def __init__(self, kind: str, num_modules: int, beta1: float, beta2: float):
        if kind not in IMPORTANCE_KINDS:
            raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {kind!r}")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
                raise ValueError(f"{name} must lie in [0, 1), got {beta!r}")
        self.kind, self.beta1, self.beta2 = kind, float(beta1), float(beta2)
        self.ipt = torch.zeros(num_modules, dtype=torch.float64)
        self.unc = torch.zeros(num_modules, dtype=torch.float64)

    def update(self, layers: Sequence[DynamicLoRALinear]) -> None:
        """Fold in the gradients the layers' LoRA factors hold now (after ``optimizer.step()``)."""
        values, seen = [], False
        with torch.no_grad():
            for layer in layers:
                total = 0.0
                for p in (layer.lora_A, layer.lora_B):
                    if p.grad is None:
                        continue
                    seen = True
                    g = p.grad.double()
                    if self.kind == "sensitivity":
                        total += float((p.detach().double() * g).abs().sum())
                    else:
                        total += float(g.pow(2).sum())
                values.append(total / layer.rank)
        if not seen:
            raise RuntimeError(
                "no LoRA parameter has a gradient: call DynamicLoRA.step() after optimizer.step() and "
                "before optimizer.zero_grad()"
            )
        current = torch.tensor(values, dtype=torch.float64)
        self.ipt.mul_(self.beta1).add_((1 - self.beta1) * current)
        self.unc.mul_(self.beta2).add_((1 - self.beta2) * (current - self.ipt).abs())

    def score(self) -> torch.Tensor:
        """``[n]`` float64: what reallocation ranks modules by."""
        return self.ipt * self.unc if self.kind == "sensitivity" else self.ipt.clone()


def plan_moves(
    score: Sequence[float], ranks: Sequence[int], max_rank: int, moves: int
) -> list[tuple[int, int]]:
    """Up to ``moves`` (donor, receiver) module indices: the lowest-scoring modules with rank > 1 give one
    unit each to the highest-scoring below ``max_rank``, best receiver with worst donor, while the
    receiver scores strictly higher; a module is in at most one pair. Ties break on the index."""
    n = len(score)
    donors = [i for i in sorted(range(n), key=lambda i: (score[i], i)) if ranks[i] > 1]
    receivers = [i for i in sorted(range(n), key=lambda i: (-score[i], i)) if ranks[i] < max_rank]
    pairs, used = [], set()
    di = ri = 0
    while len(pairs) < moves and di < len(donors) and ri < len(receivers):
        d, r = donors[di], receivers[ri]
        if d in used:
            di += 1
            continue
        if r in used:
            ri += 1
            continue
        if d == r or score[r] <= score[d]:
            break
        pairs.append((d, r))
        used.update((d, r))
        di += 1
        ri += 1
    return pairs
