"""attach / select / detach: serve many PEFT LoRA adapters, mixed per batch row, on a transformers model.

``attach(model, {"math": dir1, "code": dir2})`` reads and checks every adapter first, then replaces
each adapted ``nn.Linear`` / GPT-2 ``Conv1D`` instance in its parent by a
:class:`~dlplora_triton.layers.MultiLoRALinear` that keeps the original module as its child. No
per-model tables: what is adapted comes from the adapter files, matched to module types. ``detach()``
puts the original module objects back.

The returned :class:`MultiLoRA` handle holds the selection (per batch row, a list of
``(adapter name, weight)``) in one :class:`~dlplora_triton.layers.PlanSource` shared by every wrapped
layer. The plan (and its batch) is built once per forward pass, by the first adapted layer that needs it,
and cached per tokens-per-row inside the current selection: during ``generate()`` with a KV cache
the plan is built once at prefill and once for the first decode step, then reused; a new selection
starts with an empty cache. A forward pre-hook on the model checks that the batch has one row per
selection row before anything runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import AdapterInfo, LoadedAdapter, load_adapter
from .gates import ModuleGates
from .layers import MultiLoRALinear, PlanSource, ShrinkGroup, stack_factors
from .milora.model import milora_wrapped_modules
from .milora.serving import MiServing, prepare_milora
from .modules import forward_input, set_child
from .ops import LoRABatch, prepare_batch
from .plan import LoRAPlan
from .selection import RowSelection, Selection, check_name, normalize_selection

__all__ = ["attach", "MultiLoRA"]

_MAX_CACHED_BATCHES = 32  # keys: input shapes seen under one selection (and their token counts)
# Sibling projections that transformers models call on the same input tensor: each set found adapted
# under one parent shares one shrink (layers.ShrinkGroup checks the input is the same tensor).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


class SelectionSource(PlanSource):
    """The batch source all wrapped layers of one model share: the current selection and the prepared
    batches (:class:`~dlplora_triton.ops.LoRABatch`) built for it, one per input shape."""

    def __init__(self, num_adapters: int):
        self.num_adapters = num_adapters
        self.selection: RowSelection | None = None
        self.adapter_mask = 0
        # (input shape without K, device) or (T, device) -> batch; emptied by every set().
        self.batches: dict[tuple, LoRABatch] = {}

    def set(self, selection: RowSelection | None) -> None:
        self.selection = selection
        self.adapter_mask = 0 if selection is None else selection.adapter_mask
        self.active = self.adapter_mask != 0
        self.batches = {}

    def plan_for(self, x: torch.Tensor) -> LoRAPlan:
        return self.batch(x).plan

    def batch(self, x: torch.Tensor) -> LoRABatch:
        batch = self.batches.get((x.shape[:-1], x.device))
        return self._build(x) if batch is None else batch

    def _build(self, x: torch.Tensor) -> LoRABatch:
        selection, lead, device = self.selection, tuple(x.shape[:-1]), x.device
        if selection.seq_offsets is not None:
            T = selection.num_tokens
            if lead not in ((T,), (1, T)):
                raise ValueError(
                    f"the selection is packed (seq_offsets cover T = {T} tokens), so adapted layers expect "
                    f"inputs of shape [{T}, K] or [1, {T}, K], got {list(x.shape)}"
                )
            seq_offsets = selection.seq_offsets
        else:
            if not lead:
                raise ValueError(
                    f"adapted layers expect inputs of shape [batch, ..., K], got {list(x.shape)}"
                )
            if lead[0] != selection.rows:
                raise ValueError(
                    f"the selection has {selection.rows} rows but the batch has {lead[0]} "
                    f"(input of shape {list(x.shape)}); select one list of (name, weight) per batch row"
                )
            per_row = math.prod(lead[1:])
            T = lead[0] * per_row
            seq_offsets = None
        # [B, T, K] and [B*T, K] inputs share one batch (its variants without dropped slots included).
        batch = self.batches.get((T, device))
        if batch is None:
            if seq_offsets is None:
                seq_offsets = torch.arange(selection.rows + 1, device=device) * per_row
            if len(self.batches) >= _MAX_CACHED_BATCHES:
                self.batches.clear()
            batch = self.batches[(T, device)] = prepare_batch(
                seq_offsets.to(device),
                selection.adapter_ids.to(device),
                selection.adapter_weights.to(device),
                self.num_adapters,
                num_tokens=T,
            )
        self.batches[(x.shape[:-1], device)] = batch
        return batch


def _module_table(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> module, with each MultiLoRALinear standing for its base (its insides skipped)."""
    table: dict[str, nn.Module] = {}
    inside: str | None = None
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        if isinstance(module, MultiLoRALinear):
            table[path] = module.base
            inside = path + "."
        else:
            table[path] = module
    return table


def _factor(adapter: LoadedAdapter, path: str):
    module = adapter.modules.get(path)
    return None if module is None else (module.lora_a, module.lora_b, module.scale)


class MultiLoRA:
    """Handle on a model with attached adapters (returned by :func:`attach`).

    - ``names``: adapter names, in id order (the ids of a tensor selection);
    - ``adapters``: name -> :class:`~dlplora_triton.adapters.AdapterInfo` (rank, alpha, targets...);
    - ``layers``: module path -> :class:`~dlplora_triton.layers.MultiLoRALinear`;
    - ``select`` / ``selection`` (scoped) / ``add`` / ``remove`` / ``detach``;
    - ``set_module_gates`` (MiLoRA's per-module gates; a gate of 0 drops that row from the module's
      plan unless ``skip_zero_gates`` is False).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._names: list[str] = []
        self._infos: dict[str, AdapterInfo] = {}
        self._layers: dict[str, MultiLoRALinear] = {}
        self._source = SelectionSource(0)
        self._saved: list[RowSelection | None] = []  # selections an enclosing `with selection(...)` restores
        self._hook = None
        self._attached = False
        # MiLoRA's per-module gates and what they make of each layer's weights (gates.py).
        self._gates = ModuleGates(self._layers, self._names, lambda: self._source.selection)
        self._milora: dict[str, MiServing] = {}  # MiLoRA adapter name -> its router hooks (milora/serving.py)

    # ------------------------------------------------------------------ public API
    @property
    def names(self) -> tuple[str, ...]:
        """Adapter names in id order."""
        return tuple(self._names)

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """Adapter name -> what was read from its directory (rank, alpha, rsLoRA, targets)."""
        return dict(self._infos)

    @property
    def layers(self) -> dict[str, MultiLoRALinear]:
        """Module path -> the wrapped layer that replaced it."""
        return dict(self._layers)

    @property
    def skip_zero_gates(self) -> bool:
        """A slot whose module gate is 0 is dropped from that module's plan (no LoRA work for it). False
        computes every module for every row, the gate 0 multiplied in (the dense gated computation; the
        benchmark's comparison), from the next ``set_module_gates`` on."""
        return self._gates.skip_zero

    @skip_zero_gates.setter
    def skip_zero_gates(self, value: bool) -> None:
        self._gates.skip_zero = bool(value)

    @property
    def module_gates(self) -> ModuleGates:
        """MiLoRA's per-module gates of this model (what ``set_module_gates`` sets)."""
        return self._gates

    @property
    def attached(self) -> bool:
        return self._attached

    def gates(self, name: str) -> torch.Tensor | None:
        """``[B, num_layers, num_modules]`` gates of MiLoRA adapter ``name`` at the last prefill (None before
        one; 0 outside a row's top-k and for rows that do not select ``name``). KeyError if not MiLoRA."""
        if name not in self._milora:
            what = (
                "a plain LoRA adapter (no milora_config.json), which has no gates"
                if name in self.names
                else "not an attached adapter"
            )
            raise KeyError(
                f"{name!r} is {what}, not an attached MiLoRA adapter; MiLoRA adapters: {sorted(self._milora)}"
            )
        return self._milora[name].gates

    def select(self, selection: Selection, seq_offsets: torch.Tensor | None = None) -> None:
        """Set the adapter mix of each batch row for the following forward passes.

        Args:
            selection: one list per batch row of ``(adapter name, weight)`` pairs (``[]``: base model
                for that row; weights any finite reals), or tensors ``(adapter_ids [B, P],
                adapter_weights [B, P])`` with ids into :attr:`names` (``-1``: empty slot), or None
                (every row of any batch gets the base model, as before the first ``select``).
            seq_offsets: ``[B+1]`` int for packed variable-length input: row ``s`` owns tokens
                ``seq_offsets[s]:seq_offsets[s+1]`` of an input ``[T, hidden]`` or ``[1, T, hidden]``.
                Without it, row ``s`` is batch row ``s`` of a ``[B, seq, hidden]`` input.

        Raises KeyError for an unknown name, ValueError for a name repeated in a row, a weight that
        is not finite or bad selection tensors, TypeError for malformed entries. On error the previous
        selection stays. A row count that does not match the batch raises ValueError at forward.
        """
        self._check_attached()
        self._set_selection(normalize_selection(selection, self.names, seq_offsets))

    @contextmanager
    def selection(self, selection: Selection, seq_offsets: torch.Tensor | None = None) -> Iterator[MultiLoRA]:
        """``with lora.selection(sel): ...`` selects ``sel`` inside the block, then restores the previous one."""
        self._check_attached()
        new = normalize_selection(selection, self.names, seq_offsets)
        self._saved.append(self._source.selection)
        self._set_selection(new)
        try:
            yield self
        finally:
            previous = self._saved.pop()
            if self._attached:
                if previous is not None and previous.names != self.names:
                    previous = previous.rebased(self.names)
                self._set_selection(previous)

    def add(self, name: str, path: str | os.PathLike) -> None:
        """Load one more PEFT adapter directory (validated before anything changes)."""
        self._check_attached()
        check_name(name)
        if name in self._infos:
            raise ValueError(f"an adapter named {name!r} is already attached")
        adapter = load_adapter(name, path, _module_table(self.model))
        prepared = prepare_milora(adapter, self.model)  # None unless a MiLoRA directory
        self._install([adapter])
        if prepared is not None:
            self._milora[name] = prepared.install(self)

    def remove(self, name: str) -> None:
        """Drop one adapter; modules no remaining adapter adapts get their original module back."""
        self._check_attached()
        if name not in self._infos:
            raise KeyError(f"unknown adapter {name!r}; attached adapters: {list(self._names)}")
        for sel in [self._source.selection, *self._saved]:
            if sel is not None and name in sel.used_names():
                raise ValueError(
                    f"adapter {name!r} is used by the current selection (or one a `with selection(...)` "
                    "block will restore); select without it first"
                )
        k = self._names.index(name)
        new_names = tuple(n for n in self._names if n != name)
        updates, unwrap = {}, []
        for path, layer in self._layers.items():
            factors = layer.factors()
            del factors[k]
            if all(f is None for f in factors):
                unwrap.append(path)
            else:
                weight = layer.base.weight
                updates[path] = stack_factors(
                    factors, layer.in_features, layer.out_features, weight.dtype, weight.device
                )
        # Everything computed: now change the model.
        for path in unwrap:
            layer = self._layers.pop(path)
            set_child(self.model, path, layer.base)
            layer.plan_source = None
        for path, stacks in updates.items():
            self._layers[path].set_stacks(*stacks)
        if name in self._milora:
            self._milora.pop(name).remove()
        self._names.remove(name)
        del self._infos[name]
        self._source.num_adapters = len(self._names)
        self._group_shrinks()
        self._rebase_selection(new_names)

    def detach(self) -> None:
        """Put the original modules back: the model is exactly as before :func:`attach`."""
        self._check_attached()
        for path, layer in self._layers.items():
            set_child(self.model, path, layer.base)
            layer.plan_source = layer.shrink_group = None
        self._layers.clear()
        for served in self._milora.values():
            served.remove()
        self._milora.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._set_selection(None)
        self._attached = False

    def __repr__(self) -> str:
        if not self._attached:
            return f"MultiLoRA(detached from {type(self.model).__name__})"
        parts = []
        for name in self._names:
            info = self._infos[name]
            rs = ", rslora" if info.use_rslora else ""
            ranks = sorted(set(info.module_ranks.values()))
            rank = f"r={info.rank}" if ranks == [info.rank] else f"r={ranks}"
            parts.append(
                f"{name!r}: {rank}, alpha={info.alpha:g}{rs}, {len(info.targets)} modules ({info.targets_summary})"
            )
        sel = self._source.selection
        if sel is None:
            current = "none (base model)"
        else:
            packed = f", packed T={sel.num_tokens}" if sel.seq_offsets is not None else ""
            current = f"{sel.rows} rows using {sorted(sel.used_names()) or 'no adapter'}{packed}"
        body = "".join(f"\n  {p}," for p in parts)
        return (
            f"MultiLoRA(model={type(self.model).__name__}, layers={len(self._layers)}, adapters={{{body}\n}}, "
            f"selection={current})"
        )

    def set_module_gates(self, name: str, gates: Mapping[str, torch.Tensor] | None) -> None:
        """Scale adapter ``name``'s weight per row in some modules (MiLoRA's per-module gates).

        ``gates``: module path (a key of :attr:`layers`) -> ``[B]`` float tensor, one gate per row of
        the current selection; in that module, row ``b``'s fusion weight of ``name`` is multiplied by
        ``gates[path][b]``. Merges: the given paths are set (or overwritten), the other modules keep
        the gates they have; only the given modules are re-weighted. None clears all of ``name``'s
        gates. The gates hold for every forward of the selection (prefill and decode) and are dropped
        by the next ``select`` / ``selection`` / ``add`` / ``remove``. Gates that require grad keep
        their graph (they can be trained through the layers).

        Raises KeyError for an unknown adapter, ValueError naming the path for a module that is not
        adapted, a shape other than ``[B]`` or a NaN / inf gate, TypeError for a non-float gate; a
        failed call changes nothing.
        """
        self._check_attached()
        if name not in self._infos:
            raise KeyError(f"unknown adapter {name!r}; attached adapters: {list(self._names)}")
        self._gates.set(name, gates)

    # ------------------------------------------------------------------ internals
    def _set_selection(self, selection: RowSelection | None) -> None:
        self._source.set(selection)
        self._gates.reset()

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this MultiLoRA handle was detached; call dlplora_triton.attach again")

    def _install(self, adapters: list[LoadedAdapter]) -> None:
        """Add validated adapters: compute every new layer stack first, then change the model."""
        old_L = len(self._names)
        table = _module_table(self.model)
        wanted = {p for a in adapters for p in a.modules}
        new_paths = [p for p in table if p in wanted and p not in self._layers]  # model order
        updates = {}
        for path, layer in self._layers.items():
            factors = layer.factors() + [_factor(a, path) for a in adapters]
            weight = layer.base.weight
            updates[path] = stack_factors(
                factors, layer.in_features, layer.out_features, weight.dtype, weight.device
            )
        created = {
            path: MultiLoRALinear.from_factors(
                table[path], [None] * old_L + [_factor(a, path) for a in adapters], self._source
            )
            for path in new_paths
        }
        # Everything computed: now change the model.
        for path, stacks in updates.items():
            self._layers[path].set_stacks(*stacks)
        for path, layer in created.items():
            set_child(self.model, path, layer)
            self._layers[path] = layer
        for a in adapters:
            self._names.append(a.info.name)
            self._infos[a.info.name] = a.info
        self._source.num_adapters = len(self._names)
        self._group_shrinks()
        self._rebase_selection(tuple(self._names))

    def _group_shrinks(self) -> None:
        """Give sibling projections that read the same input one shared shrink (SHARED_INPUT)."""
        for layer in self._layers.values():
            layer.shrink_group = None
        for names in SHARED_INPUT:
            parents: dict[str, list[MultiLoRALinear]] = {}
            for path, layer in self._layers.items():
                parent, _, child = path.rpartition(".")
                if child in names:
                    parents.setdefault(parent, []).append(layer)
            for members in parents.values():
                if len(members) > 1:
                    ShrinkGroup(members)

    def _rebase_selection(self, names: tuple[str, ...]) -> None:
        sel = self._source.selection
        self._set_selection(None if sel is None else sel.rebased(names))

    def _check_batch(self, module, args, kwargs) -> None:
        """Forward pre-hook on the model: the batch must have one row per selection row."""
        sel = self._source.selection
        if sel is None or sel.seq_offsets is not None:
            return None
        x = forward_input(args, kwargs)
        if x is not None and x.shape[0] != sel.rows:
            raise ValueError(
                f"the selection has {sel.rows} rows but the batch has {x.shape[0]}; "
                "select one list of (name, weight) per batch row"
            )
        return None


def _refuse_other_loras(model: nn.Module) -> None:
    """ValueError when ``model`` already applies a LoRA of its own: attach would add the adapters' LoRA
    on top of it (applied twice for a MiLoRA served from its own directory)."""
    wrapped = milora_wrapped_modules(model)
    if wrapped:
        raise ValueError(
            f"the model is still wrapped by a dlp.MiLoRA ({len(wrapped)} modules carry its training hooks, "
            f"e.g. {wrapped[0]!r}): attach would apply its LoRA a second time. Call mi.remove() on the "
            "MiLoRA first (after mi.save(dir)), then attach(model, {name: dir})"
        )
    peft = [
        (path, m)
        for path, m in model.named_modules()
        if type(m).__module__.startswith("peft.") and hasattr(m, "lora_A") and hasattr(m, "base_layer")
    ]
    if peft:
        path, m = peft[0]
        cls = f"{type(m).__module__}.{type(m).__qualname__}"
        raise ValueError(
            f"the model carries PEFT LoRA layers ({len(peft)}, e.g. {path!r}: {cls}): attach would add its "
            "adapters on top of PEFT's. Attach to the base model instead: peft_model.unload() (or "
            "merge_and_unload() to keep PEFT's adapter merged into the weights), or load the base again"
        )


def attach(model: nn.Module, adapters: Mapping[str, str | os.PathLike]) -> MultiLoRA:
    """Attach PEFT LoRA adapters to ``model`` for per-row adapter mixing; returns the :class:`MultiLoRA` handle.

    Args:
        model: a transformers (or any torch) model; adapted modules must be ``nn.Linear`` or GPT-2
            ``Conv1D``. Module instances are replaced in their parents (classes are not patched).
        adapters: adapter name -> PEFT adapter directory (``adapter_config.json`` +
            ``adapter_model.safetensors``). Adapters may target different modules and ranks.

    Every adapter is read and checked against the model before the model is changed; on any error
    (FileNotFoundError for a missing path, ValueError naming the adapter and what is wrong) the model
    is left as it was. Until ``select`` is called, every row gets the base model. A model that applies
    a LoRA of its own is refused with ValueError naming a module and how to unwrap it: one still
    wrapped by a ``dlp.MiLoRA`` (``mi.remove()`` first) or carrying PEFT LoRA layers (``unload()``).

    Example::

        lora = attach(model, {"math": "adapters/math", "code": "adapters/code"})
        lora.select([[("math", 0.7), ("code", 0.3)], [("code", 1.0)], []])   # one list per batch row
        logits = model(input_ids).logits
        lora.detach()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"adapters must be a mapping of name -> adapter directory, got {type(adapters).__name__}"
        )
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise ValueError(
            "the model already has MultiLoRA layers; detach() the other handle first, or use its add()"
        )
    _refuse_other_loras(model)
    table = _module_table(model)
    loaded = [load_adapter(check_name(name), path, table) for name, path in adapters.items()]
    milora = {a.info.name: prepare_milora(a, model) for a in loaded}  # MiLoRA directories: their routers
    handle = MultiLoRA(model)
    handle._attached = True
    handle._install(loaded)
    handle._milora = {name: m.install(handle) for name, m in milora.items() if m is not None}
    handle._hook = model.register_forward_pre_hook(handle._check_batch, with_kwargs=True)
    return handle
