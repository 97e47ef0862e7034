"""Weighted mixes of loaded LoRA adapters for vLLM, with no change to vLLM (see docs/vllm.md).

A *mix* is a LoRA request of its own (one vLLM slot holding no weights) whose components are other
adapters, each in its own slot. The punica wrapper (:mod:`dlplora_triton.integrations.vllm`) expands a
mix's slot into its components' slots and weights, so one kernel launch reads each component's weights
once, whatever the number of mixes that use it: ``y = base(x) + sum_c w_c * B_c A_c x`` (PEFT's
``add_weighted_adapter(..., combination_type="cat")``), never a merged rank-sum copy.

How a mix reaches every worker with vLLM unchanged:

- The request's ``lora_path`` is a *mix directory* holding ``dlplora_mix.json`` (the components' names,
  LoRA ids, paths and weights), written by :func:`mix_request` (offline ``LLM``) or by
  :class:`MixResolver` (the OpenAI server, model names like ``mix:math=0.7,code=0.3``).
- :func:`install_worker_hooks` (called by the plugin's ``register()`` in every process) wraps two
  methods of vLLM's ``LRUCacheWorkerLoRAManager``: loading a mix directory registers its components in
  this process's mix table and yields an empty adapter (its slot stays zero); each step's set of
  requested adapters gains the components of the mixes in it, so they are loaded and kept in slots.

Per-token routes (:class:`LoRARouteMapping`, the form of vLLM PR #51294) go to the wrapper's
``update_metadata(..., route=...)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MIX_FILE",
    "MIX_PREFIX",
    "LoRARouteMapping",
    "MixResolver",
    "component_id",
    "install_worker_hooks",
    "mix_components",
    "mix_request",
    "parse_mix_name",
    "register_mix",
    "slot_routing",
    "unregister_mix",
    "write_mix_dir",
]

MIX_FILE = "dlplora_mix.json"
MIX_PLACEHOLDER = "dlplora_mix_placeholder"  # the one (zero, unmatched) module of a mix's LoRAModel
MIX_PREFIX = "mix:"
_FORMAT = "dlplora-mix/1"

# lora_int_id of a mix -> ((component lora_int_id, weight), ...), in this process.
_MIXES: dict[int, tuple[tuple[int, float], ...]] = {}


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
        if ids.dim() != 2 or ids.shape != weights.shape:
            raise ValueError(
                "LoRARouteMapping: token_lora_ids and token_lora_weights must both be [T, P], got "
                f"{list(ids.shape)} and {list(weights.shape)}"
            )
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("LoRARouteMapping: token_lora_weights must be finite (found NaN or inf)")
        return ids, weights


def register_mix(mix_id: int, components: Sequence[tuple[int, float]]) -> None:
    """Declare in this process that LoRA id ``mix_id`` is the mix ``sum_c w_c * LoRA_c`` of components.

    ``components``: ``(lora_int_id, weight)`` pairs of adapters that are not mixes themselves.
    """
    mix_id = int(mix_id)
    if mix_id <= 0:
        raise ValueError(f"a mix's lora_int_id must be > 0, got {mix_id}")
    pairs = tuple((int(c), float(w)) for c, w in components)
    if not pairs:
        raise ValueError(f"mix {mix_id} has no components")
    for cid, weight in pairs:
        if cid <= 0 or cid == mix_id:
            raise ValueError(f"mix {mix_id}: component id {cid} must be > 0 and differ from the mix's")
        if cid in _MIXES:
            raise ValueError(f"mix {mix_id}: component {cid} is itself a mix (mixes do not nest)")
        if not math.isfinite(weight):
            raise ValueError(f"mix {mix_id}: the weight of component {cid} is not finite ({weight})")
    if len({c for c, _ in pairs}) != len(pairs):
        raise ValueError(f"mix {mix_id}: a component appears twice in {pairs}")
    _MIXES[mix_id] = pairs


def unregister_mix(mix_id: int) -> None:
    """Forget mix ``mix_id`` in this process (no error if unknown)."""
    _MIXES.pop(int(mix_id), None)


def mix_components(mix_id: int) -> tuple[tuple[int, float], ...] | None:
    """The registered ``(component id, weight)`` pairs of ``mix_id``, or None if it is not a mix."""
    return _MIXES.get(int(mix_id))


def slot_routing(
    lora_index_to_id: Sequence[int | None],
    slots: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expand rows of vLLM slots through the mix table into component slots and weights.

    Args:
        lora_index_to_id: vLLM's slot -> LoRA id list (``None`` = free slot); ``L`` slots.
        slots: ``[T, P]`` int64 slot of each (row, p), ``-1`` = none (CPU).
        weights: ``[T, P]`` float32 weights (default ones).

    Returns:
        ``(ids [T, P'], weights [T, P'], row_plain [T])`` on the CPU: component slots (``-1`` = empty,
        packed first) and weights, ``P' >= 1``; ``row_plain[t]`` is True when row ``t`` is vLLM's own
        case (its one slot, weight 1, not a mix).
    """
    L = len(lora_index_to_id)
    slot_of = {lid: i for i, lid in enumerate(lora_index_to_id) if lid is not None}
    table: list[list[tuple[int, float]]] = []
    for i, lid in enumerate(lora_index_to_id):
        spec = _MIXES.get(lid) if lid is not None else None
        if spec is None:
            table.append([(i, 1.0)])
            continue
        row = []
        for cid, w in spec:
            if cid not in slot_of:
                loaded = sorted(x for x in lora_index_to_id if x is not None)
                raise KeyError(
                    f"mix {lid}: component adapter {cid} is not in a LoRA slot (slots hold {loaded}); "
                    "load it (it is loaded with the mix when the worker hooks are installed) and raise "
                    "max_loras if the slots are full"
                )
            row.append((slot_of[cid], w))
        table.append(row)
    table.append([])  # row L: no LoRA
    width = max(1, max(len(r) for r in table))
    t_ids = torch.full((L + 1, width), -1, dtype=torch.int64)
    t_w = torch.zeros(L + 1, width, dtype=torch.float32)
    for i, row in enumerate(table):
        for p, (s, w) in enumerate(row):
            t_ids[i, p], t_w[i, p] = s, w
    slots = slots.to("cpu", torch.int64)
    if weights is None:
        weights = torch.ones(slots.shape, dtype=torch.float32)
    if slots.numel() and (int(slots.max()) >= L or int(slots.min()) < -1):
        raise ValueError(f"slot indices must lie in -1..{L - 1}")
    key = torch.where(slots >= 0, slots, torch.full_like(slots, L))
    T = slots.shape[0]
    ids = t_ids[key].reshape(T, -1)
    w = (weights.to(torch.float32).unsqueeze(-1) * t_w[key]).reshape(T, -1)
    ids = torch.where(w != 0, ids, torch.full_like(ids, -1))  # zero weights add nothing
    # Pack the used slots first and drop the columns no row uses.
    order = (ids < 0).to(torch.int8).argsort(dim=1, stable=True)
    ids, w = ids.gather(1, order), w.gather(1, order)
    keep = max(1, int((ids >= 0).sum(1).max())) if T else 1
    ids, w = ids[:, :keep].contiguous(), w[:, :keep].contiguous()
    mix_slots = torch.tensor(
        [i for i, lid in enumerate(lora_index_to_id) if lid in _MIXES], dtype=torch.int64
    )
    if slots.shape[1] == 1:
        own = slots[:, 0]
        row_plain = ((own < 0) | (weights[:, 0] == 1)) & ~torch.isin(own, mix_slots)
    else:
        row_plain = torch.zeros(T, dtype=torch.bool)
    return ids, w, row_plain


# ---------------------------------------------------------------------------------------------------
# Mix directories, requests and names.


def _mix_root(mix_dir: str | None) -> str:
    root = (
        mix_dir
        or os.environ.get("DLPLORA_VLLM_MIX_DIR")
        or os.path.join(tempfile.gettempdir(), "dlplora-vllm-mixes")
    )
    os.makedirs(root, exist_ok=True)
    return root


def component_id(path: str) -> int:
    """A stable LoRA int id for an adapter directory (from its absolute path), in ``[2**61, 2**62)``."""
    digest = hashlib.sha256(os.path.abspath(path).encode()).digest()
    return (1 << 61) | (int.from_bytes(digest[:8], "big") & ((1 << 61) - 1))


def write_mix_dir(components: Sequence[dict], mix_dir: str | None = None) -> tuple[str, int]:
    """Write a mix directory; returns ``(path, mix lora_int_id)``, both fixed by the contents.

    ``components``: dicts with ``name``, ``lora_int_id``, ``lora_path`` and ``weight``.
    """
    comps = [
        {
            "name": str(c["name"]),
            "lora_int_id": int(c["lora_int_id"]),
            "lora_path": os.path.abspath(str(c["lora_path"])),
            "weight": float(c["weight"]),
        }
        for c in components
    ]
    if not comps:
        raise ValueError("a mix needs at least one component")
    for c in comps:
        if not math.isfinite(c["weight"]):
            raise ValueError(f"mix component {c['name']!r}: weight {c['weight']} is not finite")
        if not os.path.isdir(c["lora_path"]):
            raise FileNotFoundError(
                f"mix component {c['name']!r}: adapter directory {c['lora_path']} not found"
            )
    body = json.dumps({"format": _FORMAT, "components": comps}, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()
    path = os.path.join(_mix_root(mix_dir), digest[:32])
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, MIX_FILE)
    if not os.path.exists(target):
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(body)
        os.replace(tmp, target)  # atomic: a worker never reads half a file
    return path, (1 << 62) | (int(digest[:15], 16) & ((1 << 60) - 1))


def read_mix_dir(path: str) -> list[dict]:
    """The components of a mix directory (see :func:`write_mix_dir`); raises ValueError on a bad file."""
    target = os.path.join(path, MIX_FILE)
    with open(target) as f:
        data = json.load(f)
    if data.get("format") != _FORMAT or not isinstance(data.get("components"), list):
        raise ValueError(f"{target} is not a {_FORMAT} file")
    return data["components"]


def is_mix_dir(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, MIX_FILE))


def _mix_name(pairs: Sequence[tuple[str, float]]) -> str:
    return MIX_PREFIX + ",".join(f"{name}={weight!r}" for name, weight in pairs)


def mix_request(components, mix_dir: str | None = None, lora_name: str | None = None):
    """A vLLM ``LoRARequest`` serving the weighted mix of loaded adapters (offline ``LLM`` use).

    Args:
        components: ``[(LoRARequest, weight), ...]`` of plain adapters (each keeps its own id).
        mix_dir: where mix directories go (default ``$DLPLORA_VLLM_MIX_DIR`` or the temp dir); it
            must be readable by every worker.
        lora_name: default ``"mix:<name>=<weight>,..."``.

    Example::

        math, code = LoRARequest("math", 1, "/ad/math"), LoRARequest("code", 2, "/ad/code")
        llm.generate(prompts, lora_request=mix_request([(math, 0.7), (code, 0.3)]))
    """
    from vllm.lora.request import LoRARequest

    comps = []
    for item in components:
        request, weight = item
        if not isinstance(request, LoRARequest):
            raise TypeError(f"mix_request takes (LoRARequest, weight) pairs, got {type(request).__name__}")
        if is_mix_dir(request.lora_path):
            raise ValueError(f"mix component {request.lora_name!r} is itself a mix (mixes do not nest)")
        comps.append(
            {
                "name": request.lora_name,
                "lora_int_id": request.lora_int_id,
                "lora_path": request.lora_path,
                "weight": float(weight),
            }
        )
    path, mix_id = write_mix_dir(comps, mix_dir)
    name = lora_name or _mix_name([(c["name"], c["weight"]) for c in comps])
    return LoRARequest(lora_name=name, lora_int_id=mix_id, lora_path=path)


_NAME_RE = re.compile(r"^\s*([A-Za-z0-9_.\-/]+)\s*=\s*(\S+)\s*$")


def parse_mix_name(name: str) -> list[tuple[str, float]] | None:
    """``"mix:math=0.7,code=0.3"`` -> ``[("math", 0.7), ("code", 0.3)]``; None if not a mix name.

    Raises ValueError on a mix name that does not parse (naming the bad part).
    """
    if not name.startswith(MIX_PREFIX):
        return None
    pairs = []
    for part in name[len(MIX_PREFIX) :].split(","):
        m = _NAME_RE.match(part)
        if m is None:
            raise ValueError(f"mix name {name!r}: {part!r} is not 'adapter=weight'")
        try:
            weight = float(m.group(2))
        except ValueError:
            raise ValueError(
                f"mix name {name!r}: weight {m.group(2)!r} of {m.group(1)!r} is not a number"
            ) from None
        if not math.isfinite(weight):
            raise ValueError(f"mix name {name!r}: weight of {m.group(1)!r} is not finite")
        pairs.append((m.group(1), weight))
    if len({n for n, _ in pairs}) != len(pairs):
        raise ValueError(f"mix name {name!r} names an adapter twice")
    return pairs


class MixResolver:
    """vLLM LoRA resolver for model names ``mix:<adapter>=<weight>,...`` (the OpenAI server).

    Each ``<adapter>`` is a PEFT directory ``<adapter_dir>/<adapter>``; the resolver writes the mix
    directory and returns its ``LoRARequest`` (vLLM's server then assigns the lora_int_id). Components
    get the stable ids of :func:`component_id`. A subclass of vLLM's ``LoRAResolver`` is made by
    :func:`make_resolver` (vLLM is imported only there).
    """

    def __init__(self, adapter_dir: str, mix_dir: str | None = None):
        if not os.path.isdir(adapter_dir):
            raise FileNotFoundError(f"MixResolver: adapter directory {adapter_dir} not found")
        self.adapter_dir = adapter_dir
        self.mix_dir = mix_dir

    def request_for(self, lora_name: str):
        from vllm.lora.request import LoRARequest

        pairs = parse_mix_name(lora_name)
        if pairs is None:
            return None
        comps = []
        for name, weight in pairs:
            path = os.path.join(self.adapter_dir, name)
            if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                raise FileNotFoundError(f"mix {lora_name!r}: no PEFT adapter at {path}")
            comps.append(
                {"name": name, "lora_int_id": component_id(path), "lora_path": path, "weight": weight}
            )
        path, mix_id = write_mix_dir(comps, self.mix_dir)
        return LoRARequest(lora_name=lora_name, lora_int_id=mix_id, lora_path=path)

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        return self.request_for(lora_name)


def make_resolver(adapter_dir: str, mix_dir: str | None = None):
    """A :class:`MixResolver` that is also a vLLM ``LoRAResolver`` (imports vLLM)."""
    from vllm.lora.resolver import LoRAResolver

    cls = type("DLPLoRAMixResolver", (MixResolver, LoRAResolver), {})
    return cls(adapter_dir, mix_dir)


# ---------------------------------------------------------------------------------------------------
# Worker hooks (vLLM's LRUCacheWorkerLoRAManager), installed once per process.


_MIX_DIRS: dict[str, list] = {}  # mix directory -> its component requests (the files never change)


def _component_requests(lora_request) -> list:
    """The components' LoRARequests of a mix request (read once per directory), registering the mix."""
    from vllm.lora.request import LoRARequest

    path = lora_request.lora_path
    if path not in _MIX_DIRS:
        comps = read_mix_dir(path)
        for c in comps:
            if is_mix_dir(c["lora_path"]):
                raise ValueError(f"mix {lora_request.lora_name!r}: component {c['name']!r} is itself a mix")
        _MIX_DIRS[path] = [
            (LoRARequest(c["name"], int(c["lora_int_id"]), c["lora_path"]), float(c["weight"])) for c in comps
        ]
    pairs = _MIX_DIRS[path]
    spec = tuple((r.lora_int_id, w) for r, w in pairs)
    if _MIXES.get(lora_request.lora_int_id) != spec:
        register_mix(lora_request.lora_int_id, spec)
    return [r for r, _ in pairs]


def install_worker_hooks() -> bool:
    """Wrap ``LRUCacheWorkerLoRAManager._load_adapter`` / ``_apply_adapters`` for mixes (idempotent).

    Returns True when installed by this call, False when already in place.
    """
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    cls = LRUCacheWorkerLoRAManager
    if getattr(cls._load_adapter, "_dlplora_hook", False):
        return False
    load_adapter, apply_adapters = cls._load_adapter, cls._apply_adapters

    def _load_adapter(self, lora_request):
        if not is_mix_dir(lora_request.lora_path):
            return load_adapter(self, lora_request)
        _component_requests(lora_request)
        # A mix holds no weights of its own: its slot stays zero (no model module matches the one
        # placeholder entry, which vLLM's manager needs to find the adapter's device); the wrapper
        # reads the components' slots.
        zero = torch.zeros(1, 1)
        placeholder = LoRALayerWeights(MIX_PLACEHOLDER, 1, 1, zero, zero.clone(), scaling=1.0)
        return LoRAModel(lora_request.lora_int_id, 1, {MIX_PLACEHOLDER: placeholder})

    def _apply_adapters(self, lora_requests):
        expanded = {}
        for request in lora_requests:
            if not request:
                continue
            if is_mix_dir(request.lora_path):
                for comp in _component_requests(request):
                    expanded.setdefault(comp.lora_int_id, comp)
        for request in lora_requests:
            if request:
                expanded.setdefault(request.lora_int_id, request)
        # A list, not a set: LoRARequest hashes by name, and a component may share a plain one's name.
        return apply_adapters(self, list(expanded.values()))

    _load_adapter._dlplora_hook = True
    _apply_adapters._dlplora_hook = True
    cls._load_adapter = _load_adapter
    cls._apply_adapters = _apply_adapters
    return True
