"""Serving a saved MiLoRA through ``dlp.attach``: gates computed once per request at prefill, reused at decode.

``attach(model, {"mi": dir, ...})`` loads the directory's PEFT files as an ordinary adapter named
``"mi"`` (fused kernels, any mix with other adapters per row) and, through :func:`prepare_milora`, its
routers. :class:`MiServing` then hooks the model: at a prefill forward (no KV cache yet, or a cache of
length 0) each decoder layer's router pools that layer's input hidden states over the row's prompt
(``attention_mask``; each packed sequence alone for a packed selection) and hands the gates to the
model's gates (``dlplora_triton.gates.ModuleGates.set("mi", {module path: gates [B]})``, what
``MultiLoRA.set_module_gates`` calls) for that layer's modules only (the call merges, so the earlier
layers keep theirs): in that module, row ``b``'s fusion weight for ``"mi"`` is
multiplied by its gate. Decode steps run no router; the gates stay. Rows that do not select ``"mi"``
get gates 0 (they do not use it anyway).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..modules import forward_input
from .files import CONFIG_NAME, MiLoRAConfig, is_milora_dir, load_routers
from .routers import LayerRouter

__all__ = ["PreparedMiLoRA", "MiServing", "prepare_milora"]


class PreparedMiLoRA:
    """A MiLoRA directory read and checked against a model and its loaded adapter; nothing installed yet."""

    def __init__(self, name: str, path: str, config: MiLoRAConfig, routers: list[LayerRouter]):
        self.name, self.path, self.config, self.routers = name, path, config, routers

    def install(self, handle, every_step: bool = False) -> MiServing:
        """Hook the model of ``handle`` (a :class:`~dlplora_triton.MultiLoRA` that has the adapter)."""
        return MiServing(handle, self, every_step=every_step)


def prepare_milora(adapter, model: nn.Module) -> PreparedMiLoRA | None:
    """None unless ``adapter`` (a loaded PEFT adapter) comes from a MiLoRA directory; else its routers,
    checked: the adapted modules must be exactly the config's, with scale ``lora_alpha / r``."""
    name, path = adapter.info.name, adapter.info.path
    if not is_milora_dir(path):
        return None
    config, routers = load_routers(path, model)
    expected = {p for i in range(config.num_layers) for p in config.module_paths(i)}
    found = set(adapter.modules)
    if found != expected:
        extra, missing = sorted(found - expected)[:3], sorted(expected - found)[:3]
        raise ValueError(
            f"MiLoRA adapter {name!r} ({os.path.join(path, CONFIG_NAME)}): the LoRA files adapt other modules "
            f"than the config lists (missing {missing}, extra {extra})"
        )
    scale = config.lora_alpha / config.r
    for p, module in adapter.modules.items():
        if module.rank != config.r or abs(module.scale - scale) > 1e-6 * abs(scale):
            raise ValueError(
                f"MiLoRA adapter {name!r} ({os.path.join(path, CONFIG_NAME)}): {p} has rank {module.rank} and "
                f"scale {module.scale:g}, the config says r = {config.r}, lora_alpha / r = {scale:g}"
            )
    device = next(model.parameters()).device
    return PreparedMiLoRA(name, path, config, [r.to(device).eval().requires_grad_(False) for r in routers])


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])  # the legacy tuple format: [layer][key/value] [B, heads, T, d]
    return 0


class MiServing:
    """The hooks serving one MiLoRA adapter on an attached model (made by :meth:`PreparedMiLoRA.install`).

    ``gates``: ``[B, num_layers, num_modules]`` float32 of the last prefill (None before one);
    ``router_calls``: router runs so far (one per layer per prefill). ``every_step=True`` reruns the
    routers at every forward, decode steps included, on the step's new tokens (token-level routing,
    MOELoRA-style: the benchmark's baseline, not MiLoRA).
    """

    def __init__(self, handle, prepared: PreparedMiLoRA, every_step: bool = False):
        model = handle.model
        config = prepared.config
        self.name, self.config = prepared.name, config
        self.gates_room = handle.module_gates  # where the gates go (dlplora_triton/gates.py)
        self.routers = prepared.routers
        self.every_step = every_step
        self.paths = [config.module_paths(i) for i in range(config.num_layers)]
        self.gates: torch.Tensor | None = None
        self.router_calls = 0
        self._prefill = False
        self._mask: torch.Tensor | None = None  # [S, T] bool prompt tokens of each selection row
        self._keep: torch.Tensor | None = None  # [S, 1] float: 1 for rows that select this adapter
        self._packed = False
        layers = model.get_submodule(config.layers_path) if config.layers_path else model
        self._hooks = [model.register_forward_pre_hook(self._on_model, with_kwargs=True)]
        for i, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))

    def remove(self) -> None:
        """Take the hooks off (``detach`` / ``remove`` of the handle call this)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _on_model(self, module, args, kwargs) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._prefill = self.every_step or _cache_length(cache) == 0
        if not self._prefill:
            return None
        x = forward_input(args, kwargs)
        if x is None:
            self._prefill = False
            return None
        B, T = x.shape[:2]
        device = x.device
        selection = self.gates_room.selection()
        self._packed = selection is not None and selection.seq_offsets is not None
        mask = kwargs.get("attention_mask")
        if self.every_step or not (isinstance(mask, torch.Tensor) and tuple(mask.shape) == (B, T)):
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
        mask = mask.to(device=device, dtype=torch.bool)
        if self._packed:
            offsets = selection.seq_offsets.to(device)
            t = torch.arange(B * T, device=device)
            mask = (t >= offsets[:-1, None]) & (t < offsets[1:, None]) & mask.reshape(1, -1)
        S = mask.shape[0]
        if selection is None or self.name not in selection.names:
            keep = torch.zeros(S, dtype=torch.bool, device=device)
        else:
            k = selection.names.index(self.name)
            keep = (selection.adapter_ids.to(device) == k).any(dim=1)
        keep = keep & mask.any(dim=1)  # a row without a prompt token gets no gate
        self.gates = torch.zeros(S, self.config.num_layers, len(self.config.modules), device=device)
        self._mask, self._keep = mask, keep.to(torch.float32).unsqueeze(1)
        if not bool(keep.any()):
            self._prefill = False  # no row uses this adapter: no router work
        return None

    def _layer_hook(self, i: int):
        router = self.routers[i]
        paths = self.paths[i]

        def hook(module, args, kwargs):
            if not self._prefill:
                return None
            hidden = args[0] if args else kwargs.get("hidden_states")
            mask = self._mask
            if self._packed:
                hidden = hidden.reshape(1, -1, hidden.shape[-1]).expand(mask.shape[0], -1, -1)
            with torch.no_grad():
                _, gates = router(hidden, mask)
            self.router_calls += 1
            gates = torch.nan_to_num(gates) * self._keep
            self.gates[:, i] = gates
            # This layer's modules only: set_module_gates merges, the earlier layers keep their gates.
            self.gates_room.set(self.name, {p: gates[:, m] for m, p in enumerate(paths)})
            return None

        return hook
