"""attach / select / detach: serve many PEFT LoRA adapters, mixed per batch row, on a transformers model.

``attach(model, {"math": dir1, "code": dir2})`` reads and checks every adapter first, then replaces
each adapted ``nn.Linear`` / GPT-2 ``Conv1D`` instance in its parent by a
:class:`~dlplora_triton.layers.MultiLoRALinear` that keeps the original module as its child. No
per-model tables: what is adapted comes from the adapter files, matched to module types. ``detach()``
puts the original module objects back.

The returned :class:`MultiLoRA` handle holds the selection (per batch row, a list of
``(adapter name, weight)``) in one :class:`~dlplora_triton.layers.PlanSource` shared by every wrapped
layer. The routing plan is built once per forward pass, by the first adapted layer that needs it,
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
from .backends.torch_path import TorchPathCache
from .layers import ModuleRoute, MultiLoRALinear, PlanSource, ShrinkGroup, stack_factors
from .milora.model import milora_wrapped_modules
from .milora.serving import MiServing, prepare_milora
from .modules import forward_input, set_child
from .plan import LoRAPlan, build_plan
from .selection import RowSelection, Selection, check_name, normalize_selection

__all__ = ["attach", "MultiLoRA"]

_MAX_CACHED_PLANS = 16
# Plans of layers that drop slots (MiLoRA's per-module routes): one per distinct route and input shape,
# at most a few per adapted module and request (prefill and decode shapes).
_MAX_ROUTE_PLANS = 1024
# Sibling projections that transformers models call on the same input tensor: each set found adapted
# under one parent shares one shrink (layers.ShrinkGroup checks the input is the same tensor).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


class _Routing(PlanSource):
    """The plan source all wrapped layers of one model share: the current selection and the plans
    (each with the PyTorch path's :class:`TorchPathCache`) built for it, per input shape."""

    def __init__(self, num_adapters: int):
        self.num_adapters = num_adapters
        self.selection: RowSelection | None = None
        self.adapter_mask = 0
        # (input shape without K, device) or (T, device) -> (plan, cache); emptied by every set().
        self.plans: dict[tuple, tuple[LoRAPlan, TorchPathCache]] = {}
        # The same for layers with a ModuleRoute, keyed by the route's key first; emptied by set().
        self.route_plans: dict[tuple, tuple[LoRAPlan, TorchPathCache]] = {}

    def set(self, selection: RowSelection | None) -> None:
        self.selection = selection
        self.adapter_mask = 0 if selection is None else selection.adapter_mask
        self.active = self.adapter_mask != 0
        self.plans = {}
        self.route_plans = {}

    def plan_for(self, x: torch.Tensor) -> LoRAPlan:
        return self.batch_for(x)[0]

    def batch_for(self, x: torch.Tensor, route: ModuleRoute | None = None) -> tuple[LoRAPlan, TorchPathCache]:
        if route is None:
            entry = self.plans.get((x.shape[:-1], x.device))
            if entry is None:
                entry = self._build(self.selection, x, (x.shape[:-1], x.device))
            return entry
        # A layer that drops slots: a plan without them (built once per route and input shape, shared
        # by every layer with the same route), whose cache skips the tokens left with no adapter.
        key = (route.key, x.shape[:-1], x.device)
        entry = self.route_plans.get(key)
        if entry is None:
            entry = self._build(self.selection, x, key, route)
        return entry

    def _build(
        self, selection: RowSelection, x: torch.Tensor, key, route: ModuleRoute | None = None
    ) -> tuple[LoRAPlan, TorchPathCache]:
        lead = tuple(x.shape[:-1])
        device = x.device
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
        plans = self.plans if route is None else self.route_plans
        canonical = (T, device) if route is None else (route.key, T, device)
        entry = plans.get(canonical)
        if entry is None:
            if seq_offsets is None:
                seq_offsets = torch.arange(selection.rows + 1, device=device) * per_row
            ids = selection.adapter_ids.to(device)
            if route is not None:
                ids = ids.masked_fill(route.dropped.to(device), -1)
            plan = build_plan(
                seq_offsets.to(device),
                ids,
                selection.adapter_weights.to(device),
                self.num_adapters,
                num_tokens=T,
            )
            if len(plans) >= (_MAX_CACHED_PLANS if route is None else _MAX_ROUTE_PLANS):
                plans.clear()
            entry = plans[canonical] = (plan, TorchPathCache(plan, sparse=route is not None))
        plans[key] = entry
        return entry


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
        self._routing = _Routing(0)
        self._saved: list[RowSelection | None] = []  # selections an enclosing `with selection(...)` restores
        self._hook = None
        self._attached = False
        self._gates: dict[str, dict[str, torch.Tensor]] = {}  # adapter name -> module path -> [B] gates
        self._row_bases: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # see _row_base
        self._milora: dict[str, MiServing] = {}  # MiLoRA adapter name -> its router hooks (milora/serving.py)
        # A slot whose module gate is 0 is dropped from that module's plan (no LoRA work for it). False
        # computes every module for every row, the gate 0 multiplied in (the dense gated computation;
        # the benchmark's comparison), from the next set_module_gates on.
        self.skip_zero_gates = True

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
        is not finite or bad routing tensors, TypeError for malformed entries. On error the previous
        selection stays. A row count that does not match the batch raises ValueError at forward.
        """
        self._check_attached()
        self._set_selection(normalize_selection(selection, self.names, seq_offsets))

    @contextmanager
    def selection(self, selection: Selection, seq_offsets: torch.Tensor | None = None) -> Iterator[MultiLoRA]:
        """``with lora.selection(sel): ...`` selects ``sel`` inside the block, then restores the previous one."""
        self._check_attached()
        new = normalize_selection(selection, self.names, seq_offsets)
        self._saved.append(self._routing.selection)
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
        for sel in [self._routing.selection, *self._saved]:
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
        self._routing.num_adapters = len(self._names)
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
        sel = self._routing.selection
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
        sel = self._routing.selection
        if gates is None:
            cleared = self._gates.pop(name, {})
            self._apply_gates(sel, list(cleared))
            return
        if sel is None:
            raise ValueError("set_module_gates needs a selection: call select first")
        if not isinstance(gates, Mapping):
            raise TypeError(f"gates must map module paths to [B] tensors, got {type(gates).__name__}")
        for path, gate in gates.items():
            if path not in self._layers:
                raise ValueError(f"gates for {path!r}: not an adapted module (see lora.layers)")
            if not isinstance(gate, torch.Tensor) or not gate.is_floating_point():
                raise TypeError(f"gates for {path!r} must be a float tensor [B], got {type(gate).__name__}")
            if gate.shape != (sel.rows,):
                raise ValueError(
                    f"gates for {path!r} must be [B] = [{sel.rows}] (one per selection row), got {list(gate.shape)}"
                )
        _check_finite(gates)
        self._gates.setdefault(name, {}).update(gates)
        self._apply_gates(sel, list(gates))

    # ------------------------------------------------------------------ internals
    def _set_selection(self, selection: RowSelection | None) -> None:
        self._routing.set(selection)
        self._gates.clear()
        self._row_bases = {}
        for layer in self._layers.values():
            layer.row_weights = None
            layer.route = None

    def _apply_gates(self, sel: RowSelection | None, paths: list[str]) -> None:
        """Give the layers at ``paths`` their ``[S, P]`` per-row weights: the selection's, times the gates
        of every adapter at that path (None where no adapter has one). One stacked computation per device
        for all of ``paths``: the cost does not grow with the number of other layers.

        A slot whose gate is exactly 0 is dropped from that layer (its :class:`ModuleRoute`): the layer
        then runs on a plan without it, so a (row, module) with gate 0 costs no LoRA work, and a layer
        whose slots are all dropped costs none at all. Gates that require grad drop nothing (the
        gradient of a gate at 0 is not 0). Reading which gates are 0 costs one device sync per call."""
        by_device: dict[torch.device, list[str]] = {}
        for path in paths:
            layer = self._layers[path]
            layer.route = None
            if any(path in by_path for by_path in self._gates.values()):
                by_device.setdefault(layer.lora_a.device, []).append(path)
            else:
                layer.row_weights = None
        for device, group in by_device.items():
            ids, base = self._row_base(sel, device)
            factor = None
            for name, by_path in self._gates.items():
                if not any(p in by_path for p in group):
                    continue
                ones = None
                rows = []
                for p in group:
                    gate = by_path.get(p)
                    if gate is None:
                        ones = torch.ones(sel.rows, device=device) if ones is None else ones
                        gate = ones
                    rows.append(gate.to(device=device, dtype=torch.float32))
                stacked = torch.stack(rows)[:, :, None]  # [len(group), S, 1]
                f = torch.where(ids == self._names.index(name), stacked, 1.0)  # [len(group), S, P]
                factor = f if factor is None else factor * f
            for path, weights in zip(group, (base * factor).unbind(0)):
                self._layers[path].row_weights = weights
            if self.skip_zero_gates and not factor.requires_grad:
                self._set_routes(sel, group, (factor == 0) & (ids >= 0))

    def _set_routes(self, sel: RowSelection, paths: list[str], dropped: torch.Tensor) -> None:
        """``dropped`` ``[len(paths), S, P]`` bool: the slots each layer skips (one host read for all)."""
        flat_ids = sel.adapter_ids.reshape(-1).tolist()
        for path, flags, mask in zip(paths, dropped.reshape(len(paths), -1).tolist(), dropped.unbind(0)):
            # Even with nothing dropped the layer gets a route (key ()): its plan's cache is sparse, so
            # base rows ([] in the selection) are not computed either.
            key = tuple(i for i, d in enumerate(flags) if d)
            kept = {a for a, d in zip(flat_ids, flags) if a >= 0 and not d}
            self._layers[path].route = ModuleRoute(key, mask, sum(1 << a for a in kept))

    def _row_base(self, sel: RowSelection, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``adapter_ids [S, P]`` and the selection's weights (0 in empty slots) on ``device``, made once
        per selection and device."""
        entry = self._row_bases.get(device)
        if entry is None:
            ids = sel.adapter_ids.to(device)
            base = torch.where(ids >= 0, sel.adapter_weights.to(device=device, dtype=torch.float32), 0.0)
            entry = self._row_bases[device] = (ids, base)
        return entry

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
                table[path], [None] * old_L + [_factor(a, path) for a in adapters], self._routing
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
        self._routing.num_adapters = len(self._names)
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
        sel = self._routing.selection
        self._set_selection(None if sel is None else sel.rebased(names))

    def _check_batch(self, module, args, kwargs) -> None:
        """Forward pre-hook on the model: the batch must have one row per selection row."""
        sel = self._routing.selection
        if sel is None or sel.seq_offsets is not None:
            return None
        x = forward_input(args, kwargs)
        if x is not None and x.shape[0] != sel.rows:
            raise ValueError(
                f"the selection has {sel.rows} rows but the batch has {x.shape[0]}; "
                "select one list of (name, weight) per batch row"
            )
        return None


def _check_finite(gates: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the first path whose gates hold NaN or inf; one device sync per device."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for gate in gates.values():
        flags.setdefault(gate.device, []).append(torch.isfinite(gate.detach()).all())
    if all(bool(torch.stack(f).all()) for f in flags.values()):
        return
    for path, gate in gates.items():
        if not bool(torch.isfinite(gate.detach()).all()):
            raise ValueError(f"gates for {path!r} must be finite (found NaN or inf)")


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
