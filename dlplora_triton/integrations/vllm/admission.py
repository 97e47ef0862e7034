"""Which waiting requests may take adapter slots this step: the mix-aware admission of the scheduler hook.

vLLM's scheduler counts one LoRA per request; a mix needs a slot for each of its components. Admitting
in queue order only the requests that fit is not enough: a mix of three waits for three free slots
while one-adapter requests behind it keep taking whichever slot frees up, so under steady traffic it
could wait for ever. The policy here bounds that wait:

- a request is admitted when its adapters fit beside those of the running requests and of the
  requests admitted before it in this step (a request without a LoRA always fits);
- a request held back for ``patience`` steps or more *reserves* its adapters: while the oldest such
  request does not fit, a request behind it is admitted only if it leaves room for the reservation
  (its adapters, the held ones and the reserved ones fit in the slots together), or if it needs only
  reserved adapters and those of the held ones that can stay beside them (the lowest ids, as many as
  the slots leave). No other adapter then takes a new request, so the rest drain as their running
  requests finish (each within its ``max_tokens``), and the reserved request is admitted once they
  have: its wait is bounded by ``patience`` plus a few requests' lifetimes, whatever arrives.

Pure Python, no vLLM: :class:`~dlplora_triton.integrations.vllm.engine.MixSlotsScheduler` applies it
to vLLM's queue, and the tests drive it through adversarial sequences.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Admission", "DEFAULT_PATIENCE", "PATIENCE_ENV", "admit", "patience_from_env"]

# Steps a request may be held back before it reserves its slots. A reservation drains slots, which
# costs the others throughput (a step simulation of Zipf traffic with 16 closed-loop clients lost
# 3-20% with patience 2-8 and about nothing from 32 on, where mixes did not starve anyway); under
# adversarial traffic it is what bounds a mix's wait. 16 steps: a fraction of a typical request's life.
DEFAULT_PATIENCE = 16
PATIENCE_ENV = "DLPLORA_MIX_PATIENCE"


@dataclass(frozen=True)
class Admission:
    """One step's decision: the keys held back (in queue order) and the adapter ids reserved."""

    held_back: list
    reserved: frozenset


def admit(
    held: Iterable[int],
    waiting: Sequence[tuple[Hashable, frozenset, int]],
    max_loras: int,
    patience: int = DEFAULT_PATIENCE,
) -> Admission:
    """Decide one step: ``held`` are the adapter ids of the running requests; ``waiting`` lists, in
    queue order, ``(key, adapter ids needed, steps held back so far)`` for each waiting request."""
    held = set(held)
    reserved: frozenset = frozenset()
    allowed: frozenset = frozenset()  # what a request may need and still run beside a reservation
    held_back = []
    for key, need, waited in waiting:
        fits = not need or len(held | need) <= max_loras
        if fits and reserved and not need <= allowed:
            fits = len(held | need | reserved) <= max_loras
        if fits:
            held |= need
            continue
        held_back.append(key)
        if not reserved and waited >= patience and len(need) <= max_loras:
            # The oldest patient-enough request: room is kept for it. Of the adapters in slots that it
            # does not need, the lowest ids (a choice that holds from step to step) keep taking new
            # requests, as many as can stay beside it; the others drain.
            reserved = frozenset(need)
            allowed = reserved | frozenset(sorted(held - reserved)[: max_loras - len(reserved)])
    return Admission(held_back, reserved)


def patience_from_env(environ=os.environ) -> int:
    """``DLPLORA_MIX_PATIENCE`` (steps, an integer >= 0), or :data:`DEFAULT_PATIENCE` when unset."""
    value = environ.get(PATIENCE_ENV)
    if value is None or value == "":
        return DEFAULT_PATIENCE
    try:
        steps = int(value)
    except ValueError:
        raise ValueError(f"{PATIENCE_ENV} must be a whole number of steps >= 0, got {value!r}") from None
    if steps < 0:
        raise ValueError(f"{PATIENCE_ENV} must be a whole number of steps >= 0, got {value!r}")
    return steps
