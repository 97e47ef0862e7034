"""MiLoRA's per-module gates on an attached model: per-row weights and dropped slots of each layer.

``MultiLoRA.set_module_gates(name, {path: gates [B]})`` (and MiLoRA's serving hooks,
``milora/serving.py``) land here. For each adapted layer at a gated path the room computes the layer's
``[S, P]`` per-row fusion weights (the selection's, times the gates of every adapter at that path) and
the slots it drops (:class:`~dlplora_triton.ops.DroppedSlots`: gate exactly 0), and hands both to the
layer (``row_weights``, ``dropped_slots``), which passes them with the batch to ``ops``. Plain PEFT adapters
never reach this module: without gates every layer runs on the selection's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .ops import DroppedSlots
from .selection import RowSelection

__all__ = ["ModuleGates"]


class ModuleGates:
    """The gates of every adapter on one model's adapted layers (one per :class:`~dlplora_triton.MultiLoRA`).

    ``layers``: module path -> :class:`~dlplora_triton.layers.MultiLoRALinear` and ``names``: adapter
    names in id order, both the handle's own (kept current by it); ``selection()`` returns the current
    :class:`~dlplora_triton.selection.RowSelection`. ``skip_zero``: drop a slot whose gate is 0 from that
    layer's plan (False: compute it, the gate 0 multiplied in).
    """

    def __init__(self, layers: Mapping, names: list[str], selection: Callable[[], RowSelection | None]):
        self.layers, self.names, self.selection = layers, names, selection
        self.skip_zero = True
        self._by_name: dict[str, dict[str, torch.Tensor]] = {}  # adapter name -> module path -> [B] gates
        self._row_bases: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # see _row_base

    def reset(self) -> None:
        """Drop every gate (a new selection): each layer runs on the selection's weights again."""
        self._by_name.clear()
        self._row_bases = {}
        for layer in self.layers.values():
            layer.row_weights = None
            layer.dropped_slots = None

    def set(self, name: str, gates: Mapping[str, torch.Tensor] | None) -> None:
        """Set (merge) adapter ``name``'s ``[B]`` gates per module path, or clear them all (None).
        See :meth:`dlplora_triton.MultiLoRA.set_module_gates` for the rules and errors."""
        sel = self.selection()
        if gates is None:
            cleared = self._by_name.pop(name, {})
            self._apply(sel, list(cleared))
            return
        if sel is None:
            raise ValueError("set_module_gates needs a selection: call select first")
        if not isinstance(gates, Mapping):
            raise TypeError(f"gates must map module paths to [B] tensors, got {type(gates).__name__}")
        for path, gate in gates.items():
            if path not in self.layers:
                raise ValueError(f"gates for {path!r}: not an adapted module (see lora.layers)")
            if not isinstance(gate, torch.Tensor) or not gate.is_floating_point():
                raise TypeError(f"gates for {path!r} must be a float tensor [B], got {type(gate).__name__}")
            if gate.shape != (sel.rows,):
                raise ValueError(
                    f"gates for {path!r} must be [B] = [{sel.rows}] (one per selection row), got {list(gate.shape)}"
                )
        _check_finite(gates)
        self._by_name.setdefault(name, {}).update(gates)
        self._apply(sel, list(gates))

    def _apply(self, sel: RowSelection | None, paths: list[str]) -> None:
        """Give the layers at ``paths`` their ``[S, P]`` per-row weights: the selection's, times the gates
        of every adapter at that path (None where no adapter has one). One stacked computation per device
        for all of ``paths``: the cost does not grow with the number of other layers.

        A slot whose gate is exactly 0 is dropped from that layer (its :class:`DroppedSlots`): the layer
        then runs on a plan without it, so a (row, module) with gate 0 costs no LoRA work, and a layer
        whose slots are all dropped costs none at all. Gates that require grad drop nothing (the
        gradient of a gate at 0 is not 0). Reading which gates are 0 costs one device sync per call."""
        by_device: dict[torch.device, list[str]] = {}
        for path in paths:
            layer = self.layers[path]
            layer.dropped_slots = None
            if any(path in by_path for by_path in self._by_name.values()):
                by_device.setdefault(layer.lora_a.device, []).append(path)
            else:
                layer.row_weights = None
        for device, group in by_device.items():
            ids, base = self._row_base(sel, device)
            factor = None
            for name, by_path in self._by_name.items():
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
                f = torch.where(ids == self.names.index(name), stacked, 1.0)  # [len(group), S, P]
                factor = f if factor is None else factor * f
            for path, weights in zip(group, (base * factor).unbind(0)):
                self.layers[path].row_weights = weights
            if self.skip_zero and not factor.requires_grad:
                self._set_dropped(sel, group, (factor == 0) & (ids >= 0))

    def _set_dropped(self, sel: RowSelection, paths: list[str], dropped: torch.Tensor) -> None:
        """``dropped`` ``[len(paths), S, P]`` bool: the slots each layer skips (one host read for all)."""
        flat_ids = sel.adapter_ids.reshape(-1).tolist()
        for path, flags, mask in zip(paths, dropped.reshape(len(paths), -1).tolist(), dropped.unbind(0)):
            # Even with nothing dropped the layer gets its DroppedSlots (key ()): its batch is sparse, so
            # base rows ([] in the selection) are not computed either.
            key = tuple(i for i, d in enumerate(flags) if d)
            kept = {a for a, d in zip(flat_ids, flags) if a >= 0 and not d}
            self.layers[path].dropped_slots = DroppedSlots(key, mask, sum(1 << a for a in kept))

    def _row_base(self, sel: RowSelection, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``adapter_ids [S, P]`` and the selection's weights (0 in empty slots) on ``device``, made once
        per selection and device."""
        entry = self._row_bases.get(device)
        if entry is None:
            ids = sel.adapter_ids.to(device)
            base = torch.where(ids >= 0, sel.adapter_weights.to(device=device, dtype=torch.float32), 0.0)
            entry = self._row_bases[device] = (ids, base)
        return entry


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
