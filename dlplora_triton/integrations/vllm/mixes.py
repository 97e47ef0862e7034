"""Weighted mixes of loaded adapters, per request (see docs/vllm.md); no vLLM import at module level.

A mix request is an ordinary vLLM request whose LoRA is the mix's *anchor*, plus the mix itself in its
sampling parameters' ``extra_args[MIX_ARG]``:

- the anchor is a ``LoRARequest`` with the first component's ``lora_int_id`` and ``lora_path`` and the
  mix's own name (``mix:de=0.7,code=0.3``). The id puts the mix in the slot of a component it needs
  anyway, so vLLM's scheduler counts nothing that does not exist; the name keys vLLM's prefix cache, so
  two weightings never share cached blocks while the same mix does;
- ``extra_args[MIX_ARG]`` lists every component (name, LoRA id, path, weight), and
  ``extra_args[MIX_SIGNATURE_ARG]`` signs it with the deployment's key (:func:`mix_args`): the engine
  serves only mixes made by the server or by :func:`mix_request`, never paths a client wrote. The
  engine's scheduler counts all components against ``max_loras`` and the workers load them and route
  the request's tokens to ``sum_c w_c * LoRA_c(x)`` (:mod:`dlplora_triton.integrations.vllm.engine`).

Nothing is written or registered per mix: weights live in the request and die with it. A mix is PEFT's
``add_weighted_adapter(..., combination_type="cat")``, exactly; weights are reals in ``[-1000, 1000]``
(:func:`check_weight`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MIX_ARG",
    "MIX_KEY_ENV",
    "MIX_PREFIX",
    "MIX_SIGNATURE_ARG",
    "LoRARouteMapping",
    "MixComponent",
    "canonical_mix_name",
    "check_weight",
    "decode_mix",
    "encode_mix",
    "mix_args",
    "mix_key",
    "mix_request",
    "parse_mix_name",
    "request_mix",
    "sign_mix",
    "slot_routing",
    "verify_mix_args",
]

MIX_PREFIX = "mix:"
MIX_ARG = "dlplora_mix"  # the key in SamplingParams.extra_args (vllm_xargs over HTTP)
MIX_SIGNATURE_ARG = "dlplora_mix_signature"  # its HMAC, made with this deployment's key
MIX_KEY_ENV = "DLPLORA_MIX_KEY"
# ASCII only (re.ASCII): \d would match other scripts' digits, which float() reads.
# No path separators, no leading dot.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}", re.ASCII)
# Unambiguous, so a long non-number is refused in linear time; at most 64 characters.
WEIGHT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
MAX_WEIGHT_TEXT = 64
MAX_WEIGHT = 1000.0  # a mix weight's largest magnitude (see check_weight)


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


def check_weight(weight, what: str) -> float:
    """``weight`` as a float when a mix may use it; ValueError naming ``what`` otherwise.

    A weight must be finite and within ``[-MAX_WEIGHT, MAX_WEIGHT]``: a request's weight scales its
    rows' activations, and a huge one (3e38, still finite in float32) overflows them to inf / NaN,
    which can reach later requests through reused KV-cache blocks. A nonzero weight that float32 (the
    dtype the kernels apply it in) rounds to 0 (1e-50) is refused too: it would silently drop its adapter.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"{what}: the weight must be a number, got {weight!r:.80}")
    try:
        weight = float(weight)
    except OverflowError:  # an int beyond float64
        weight = math.inf
    if not math.isfinite(weight):
        raise ValueError(f"{what}: the weight {weight!r} is not finite")
    if abs(weight) > MAX_WEIGHT:
        raise ValueError(f"{what}: the weight {weight!r} lies outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
    if weight != 0 and struct.unpack("f", struct.pack("f", weight))[0] == 0:
        raise ValueError(f"{what}: the weight {weight!r} is 0 in float32 (write 0 for no contribution)")
    return weight


def parse_mix_name(name: str, max_components: int | None = None) -> list[tuple[str, float]] | None:
    """``"mix:de=0.7,code=0.3"`` -> ``[("de", 0.7), ("code", 0.3)]``; None if ``name`` is not a mix name.

    Strict, and linear in the name's length: no whitespace; adapter names of letters, digits, ``_``,
    ``.``, ``-`` (no path separators, no leading dot); weights in ASCII decimal notation (``0.7``,
    ``-3``, ``1e-3``; no ``_``, no ``inf``/``nan``). Raises ValueError naming the bad part: more than
    ``max_components`` components (checked first), an empty mix, a part that is not ``adapter=weight``,
    a bad adapter name, a weight that is not a number or that :func:`check_weight` refuses, an adapter
    named twice, or weights that sum to 0 (the mix would cancel out: name the base model instead).
    """
    if not isinstance(name, str) or not name.startswith(MIX_PREFIX):
        return None
    shown = name if len(name) <= 80 else name[:77] + "..."
    body = name[len(MIX_PREFIX) :]
    if not body:
        raise ValueError(f"mix name {shown!r} names no adapter (expected mix:<adapter>=<weight>,...)")
    count = body.count(",") + 1
    if max_components is not None and count > max_components:
        raise ValueError(
            f"mix name {shown!r} has {count} components; this server holds at most {max_components} "
            "adapters at once (max_loras)"
        )
    pairs, seen = [], set()
    for part in body.split(","):
        adapter, eq, weight_text = part.partition("=")
        if not eq or not adapter or not weight_text:
            raise ValueError(f"mix name {shown!r}: {part[:80]!r} is not 'adapter=weight'")
        if not ADAPTER_NAME.fullmatch(adapter):
            raise ValueError(
                f"mix name {shown!r}: {adapter[:80]!r} is not an adapter name (letters, digits, '_', '.', "
                "'-'; no path separators, no whitespace)"
            )
        if len(weight_text) > MAX_WEIGHT_TEXT or not WEIGHT_TEXT.fullmatch(weight_text):
            raise ValueError(
                f"mix name {shown!r}: weight {weight_text[:80]!r} of {adapter!r} is not a number "
                "(decimal notation such as 0.7, -2 or 1e-3)"
            )
        weight = check_weight(float(weight_text), f"mix name {shown!r}: adapter {adapter!r}")
        if adapter in seen:
            raise ValueError(f"mix name {shown!r} names {adapter!r} twice")
        seen.add(adapter)
        pairs.append((adapter, weight))
    if sum(w for _, w in pairs) == 0:
        raise ValueError(f"mix name {shown!r}: the weights sum to 0 (for no adapter, name the base model)")
    return pairs


def canonical_mix_name(pairs: Sequence[tuple[str, float]]) -> str:
    """``[("de", 0.7), ("code", 0.3)]`` -> ``"mix:de=0.7,code=0.3"`` (weights as Python's ``repr``)."""
    return MIX_PREFIX + ",".join(f"{name}={float(weight)!r}" for name, weight in pairs)


# -- the mix in a request ------------------------------------------------------------------------------


def encode_mix(components: Sequence[MixComponent]) -> str:
    """The ``extra_args[MIX_ARG]`` value of a mix: JSON, as vLLM's ``vllm_xargs`` carries strings."""
    return json.dumps([[c.name, int(c.lora_int_id), str(c.lora_path), float(c.weight)] for c in components])


def mix_key() -> bytes:
    """This deployment's key for signing mixes: ``$DLPLORA_MIX_KEY``, made once if unset.

    Made in the first vLLM process (the plugin's ``register``, when vLLM parses its arguments) and put
    into its environment, so every process vLLM starts after it (engine core, workers, API servers)
    inherits the same key. Engines on other machines need it set to the same value.
    """
    key = os.environ.get(MIX_KEY_ENV)
    if not key:
        key = os.environ[MIX_KEY_ENV] = secrets.token_hex(32)
    return key.encode()


def sign_mix(text: str) -> str:
    """The HMAC-SHA256 of a mix's ``extra_args[MIX_ARG]`` text under :func:`mix_key`."""
    return hmac.new(mix_key(), text.encode(), hashlib.sha256).hexdigest()


def mix_args(components: Sequence[MixComponent]) -> dict[str, str]:
    """The ``extra_args`` of a mix: its components and their signature.

    The engine serves a mix only when the signature matches: a mix names adapter *paths*, and only the
    server (from adapters the operator registered) and in-process code (:func:`mix_request`) may name
    them; a client that writes ``vllm_xargs`` itself cannot.
    """
    text = encode_mix(components)
    return {MIX_ARG: text, MIX_SIGNATURE_ARG: sign_mix(text)}


def verify_mix_args(extra: dict) -> str:
    """The mix text of ``extra_args`` when its signature is this deployment's; ValueError otherwise."""
    text, signature = extra.get(MIX_ARG), extra.get(MIX_SIGNATURE_ARG)
    if (
        not isinstance(text, str)
        or not isinstance(signature, str)
        or not hmac.compare_digest(signature.encode(), sign_mix(text).encode())
    ):
        raise ValueError(
            f"{MIX_ARG} does not carry this server's signature: mixes come from the server's mix: names "
            "or mix_request, never from a client's vllm_xargs"
        )
    return text


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
        )
        if not ok:
            raise ValueError(
                f"{MIX_ARG}: {row!r:.200} is not [name, lora_int_id > 0, lora_path, finite weight]"
            )
        weight = check_weight(row[3], f"{MIX_ARG}: component {row[0][:80]!r}")
        components.append(MixComponent(row[0], row[1], row[2], weight))
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
        weight = check_weight(weight, f"mix_request: adapter {request.lora_name!r}")
        mix.append(MixComponent(request.lora_name, request.lora_int_id, request.lora_path, weight))
    name = lora_name or canonical_mix_name([(c.name, c.weight) for c in mix])
    parse_mix_name(canonical_mix_name([(c.name, c.weight) for c in mix]))  # the same rules as over HTTP
    decode_mix(encode_mix(mix))  # ids unique and positive
    params = copy.deepcopy(sampling_params) if sampling_params is not None else SamplingParams()
    params.extra_args = dict(params.extra_args or {}, **mix_args(mix))
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
