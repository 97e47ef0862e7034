"""Weighted mixes of loaded adapters, per request (see docs/vllm.md); no vLLM import at module level.

A mix request is an ordinary vLLM request whose LoRA is the mix's *anchor*, plus the mix itself in its
sampling parameters' ``extra_args[MIX_ARG]``:

- the anchor is a ``LoRARequest`` with the first component's ``lora_int_id`` and ``lora_path`` and the
  mix's own name (``mix:de=0.7,code=0.3``). The id puts the mix in the slot of a component it needs
  anyway, so vLLM's scheduler counts nothing that does not exist; the name keys vLLM's prefix cache, so
  two weightings never share cached blocks while the same mix does;
- ``extra_args[MIX_ARG]`` lists every component (name, LoRA id, path, weight). The engine's scheduler
  counts all of them against ``max_loras`` and the workers load them and route the request's tokens to
  ``sum_c w_c * LoRA_c(x)`` (:mod:`dlplora_triton.integrations.vllm.engine`).

Nothing is written or registered per mix: weights live in the request and die with it. A mix is PEFT's
``add_weighted_adapter(..., combination_type="cat")``, exactly; weights are any finite reals.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MIX_ARG",
    "MIX_PREFIX",
    "LoRARouteMapping",
    "MixComponent",
    "canonical_mix_name",
    "decode_mix",
    "encode_mix",
    "mix_request",
    "parse_mix_name",
    "request_mix",
    "slot_routing",
]

MIX_PREFIX = "mix:"
MIX_ARG = "dlplora_mix"  # the key in SamplingParams.extra_args (vllm_xargs over HTTP)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")  # no path separators, no leading dot


@dataclass(frozen=True)
class MixComponent:
    """One adapter of a mix: vLLM's ``LoRARequest`` fields and the weight."""

    name: str
    lora_int_id: int
    lora_path: str
    weight: float


@dataclass(frozen=True)
class LoRARouteMapping:
    """Per-token routes over loaded adapters (the form of vLLM PR #51294's ``LoRARouteMapping``).

    ``token_lora_ids[t, p]`` is the LoRA int id (``lora_int_id``) of slot ``p`` of token ``t``; ``<= 0``
    is an empty slot. ``token_lora_weights[t, p]`` is its weight (any finite real). Both ``[T, P]``,
    nested sequences or tensors. Token ``t`` gets ``sum_p w[t, p] * LoRA_{id[t, p]}(x[t])``.
    """

    token_lora_ids: Sequence[Sequence[int]] | torch.Tensor
    token_lora_weights: Sequence[Sequence[float]] | torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([T, P] int64, [T, P] float32)`` on the CPU, checked."""
        ids = torch.as_tensor(self.token_lora_ids).to("cpu", torch.int64)
        weights = torch.as_tensor(self.token_lora_weights).to("cpu", torch.float32)
        if ids.shape == weights.shape == (0,):  # no rows given as empty sequences: [0, 1]
            ids, weights = ids.reshape(0, 1), weights.reshape(0, 1)
        if ids.dim() != 2 or ids.shape != weights.shape:
            raise ValueError(
                "LoRARouteMapping: token_lora_ids and token_lora_weights must both be [T, P], got "
                f"{list(ids.shape)} and {list(weights.shape)}"
            )
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("LoRARouteMapping: token_lora_weights must be finite (found NaN or inf)")
        return ids, weights


# -- names ---------------------------------------------------------------------------------------------


def parse_mix_name(name: str, max_components: int | None = None) -> list[tuple[str, float]] | None:
    """``"mix:de=0.7,code=0.3"`` -> ``[("de", 0.7), ("code", 0.3)]``; None if ``name`` is not a mix name.

    Raises ValueError naming the bad part: an empty mix, a part that is not ``adapter=weight``, an
    adapter name with a path separator, a weight that is not a finite number, an adapter named twice,
    more than ``max_components`` components, or weights that sum to 0 (the mix would cancel out: name
    the base model instead).
    """
    if not isinstance(name, str) or not name.startswith(MIX_PREFIX):
        return None
    body = name[len(MIX_PREFIX) :]
    if not body.strip():
        raise ValueError(f"mix name {name!r} names no adapter (expected mix:<adapter>=<weight>,...)")
    pairs = []
    for part in body.split(","):
        adapter, eq, weight_text = part.partition("=")
        adapter, weight_text = adapter.strip(), weight_text.strip()
        if not eq or not adapter or not weight_text:
            raise ValueError(f"mix name {name!r}: {part.strip()!r} is not 'adapter=weight'")
        if not ADAPTER_NAME.fullmatch(adapter):
            raise ValueError(
                f"mix name {name!r}: {adapter!r} is not an adapter name (letters, digits, '_', '.', '-'; "
                "no path separators)"
            )
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(
                f"mix name {name!r}: weight {weight_text!r} of {adapter!r} is not a number"
            ) from None
        if not math.isfinite(weight):
            raise ValueError(f"mix name {name!r}: weight {weight_text!r} of {adapter!r} is not finite")
        pairs.append((adapter, weight))
    names = [n for n, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"mix name {name!r} names {repeated[0]!r} twice")
    if max_components is not None and len(pairs) > max_components:
        raise ValueError(
            f"mix name {name!r} has {len(pairs)} components; this server holds at most {max_components} "
            "adapters at once (max_loras)"
        )
    if sum(w for _, w in pairs) == 0:
        raise ValueError(f"mix name {name!r}: the weights sum to 0 (for no adapter, name the base model)")
    return pairs


def canonical_mix_name(pairs: Sequence[tuple[str, float]]) -> str:
    """``[("de", 0.7), ("code", 0.3)]`` -> ``"mix:de=0.7,code=0.3"`` (weights as Python's ``repr``)."""
    return MIX_PREFIX + ",".join(f"{name}={float(weight)!r}" for name, weight in pairs)


# -- the mix in a request ------------------------------------------------------------------------------


def encode_mix(components: Sequence[MixComponent]) -> str:
    """The ``extra_args[MIX_ARG]`` value of a mix: JSON, as vLLM's ``vllm_xargs`` carries strings."""
    return json.dumps([[c.name, int(c.lora_int_id), str(c.lora_path), float(c.weight)] for c in components])


def decode_mix(value) -> tuple[MixComponent, ...]:
    """The components of an ``extra_args[MIX_ARG]`` value; ValueError naming what is wrong."""
    try:
        rows = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        raise ValueError(f"{MIX_ARG}: not JSON ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{MIX_ARG}: expected a non-empty list of [name, lora_int_id, lora_path, weight]")
    components = []
    for row in rows:
        ok = (
            isinstance(row, list)
            and len(row) == 4
            and isinstance(row[0], str)
            and isinstance(row[1], int)
            and not isinstance(row[1], bool)
            and row[1] > 0
            and isinstance(row[2], str)
            and isinstance(row[3], (int, float))
            and not isinstance(row[3], bool)
            and math.isfinite(row[3])
        )
        if not ok:
            raise ValueError(f"{MIX_ARG}: {row!r} is not [name, lora_int_id > 0, lora_path, finite weight]")
        components.append(MixComponent(row[0], row[1], row[2], float(row[3])))
    ids = [c.lora_int_id for c in components]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{MIX_ARG}: a LoRA id appears twice in {ids}")
    return tuple(components)


@functools.lru_cache(maxsize=4096)
def _decode_text(value: str) -> tuple[MixComponent, ...]:
    return decode_mix(value)


def request_mix(sampling_params) -> tuple[MixComponent, ...] | None:
    """The mix a request's sampling parameters carry, or None (a plain request).

    Called for every request of every step by the workers: a mix's text is decoded once (cached).
    """
    extra = getattr(sampling_params, "extra_args", None)
    if not extra or MIX_ARG not in extra:
        return None
    value = extra[MIX_ARG]
    return _decode_text(value) if isinstance(value, str) else decode_mix(value)


def mix_request(components, sampling_params=None, lora_name: str | None = None):
    """``(LoRARequest, SamplingParams)`` serving the weighted mix of adapters (offline ``LLM`` use).

    Args:
        components: ``[(LoRARequest, weight), ...]`` of plain adapters, each with its own id.
        sampling_params: the request's parameters (default ``SamplingParams()``); a copy is returned.
        lora_name: the anchor's name (default ``"mix:<name>=<weight>,..."``); it keys the prefix cache.

    Example::

        de, code = LoRARequest("de", 1, "/ad/de"), LoRARequest("code", 2, "/ad/code")
        lora, params = mix_request([(de, 0.7), (code, 0.3)], SamplingParams(max_tokens=64))
        llm.generate(["Hallo"], params, lora_request=lora)
    """
    import copy

    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    mix = []
    for item in components:
        request, weight = item
        if not isinstance(request, LoRARequest):
            raise TypeError(f"mix_request takes (LoRARequest, weight) pairs, got {type(request).__name__}")
        mix.append(MixComponent(request.lora_name, request.lora_int_id, request.lora_path, float(weight)))
    name = lora_name or canonical_mix_name([(c.name, c.weight) for c in mix])
    parse_mix_name(canonical_mix_name([(c.name, c.weight) for c in mix]))  # the same rules as over HTTP
    decode_mix(encode_mix(mix))  # ids unique and positive
    params = copy.deepcopy(sampling_params) if sampling_params is not None else SamplingParams()
    params.extra_args = dict(params.extra_args or {}, **{MIX_ARG: encode_mix(mix)})
    anchor = LoRARequest(lora_name=name, lora_int_id=mix[0].lora_int_id, lora_path=mix[0].lora_path)
    return anchor, params


# -- routing rows to slots -----------------------------------------------------------------------------


def slot_routing(
    num_slots: int, slots: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``(slot, weight)`` pairs, packed for one plan.

    Args:
        num_slots: ``L``, vLLM's LoRA slots.
        slots: ``[T, P]`` int64 slot of each (row, p), ``-1`` = none (CPU).
        weights: ``[T, P]`` float32 weights (default ones).

    Returns:
        ``(ids [T, P'], weights [T, P'], row_plain [T])`` on the CPU: the used slots packed first
        (``-1`` = empty; a zero weight adds nothing, so its slot is dropped), ``P' >= 1``;
        ``row_plain[t]`` is True when row ``t`` is vLLM's own case (at most one slot, weight 1).
    """
    slots = slots.to("cpu", torch.int64)
    if weights is None:
        weights = torch.ones(slots.shape, dtype=torch.float32)
    weights = weights.to("cpu", torch.float32)
    if slots.numel() and (int(slots.max()) >= num_slots or int(slots.min()) < -1):
        raise ValueError(f"slot indices must lie in -1..{num_slots - 1}")
    T = slots.shape[0]
    ids = torch.where((slots >= 0) & (weights != 0), slots, torch.full_like(slots, -1))
    w = torch.where(ids >= 0, weights, torch.zeros_like(weights))
    order = (ids < 0).to(torch.int8).argsort(dim=1, stable=True)
    ids, w = ids.gather(1, order), w.gather(1, order)
    used = (ids >= 0).sum(1)
    keep = max(1, int(used.max())) if T else 1
    ids, w = ids[:, :keep].contiguous(), w[:, :keep].contiguous()
    row_plain = (used == 0) | ((used == 1) & (w[:, 0] == 1))
    return ids, w, row_plain
