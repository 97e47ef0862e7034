"""``MiLoRA``: LoRA factors on the modules of every decoder layer plus a layer router per layer, trained together.

The wrapped model is not restructured: each adapted ``nn.Linear`` / ``Conv1D`` gets a forward hook that
adds ``gate[b] * scale * (x A^T) B^T`` to its output, and each decoder layer gets a forward pre-hook
that runs its :class:`~dlplora_triton.milora.routers.LayerRouter` on the layer's input hidden states
(pooled over the prompt tokens) and sets the gates its modules read. :meth:`MiLoRA.remove` takes every
hook off and restores the base parameters' ``requires_grad``. What is trained, how it is saved and how
it is served: docs/milora.md.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import torch
from torch import nn

from ..modules import linear_features
from .files import load_milora, save_milora
from .routers import LayerRouter, balance_loss, check_pooling, check_top_k

__all__ = ["MiLoRA", "find_decoder_layers", "layer_modules", "milora_wrapped_modules"]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the model's stack of decoder (or encoder) layers.

    The ``nn.ModuleList`` whose entries all have one class and hold a module a LoRA can wrap; with
    several, the one with the most parameters (Llama's ``model.layers``, BERT's ``encoder.layer``).
    """
    best = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(linear_features(m) is not None for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, path, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: found no stack of decoder layers (an nn.ModuleList of one layer class "
            "holding nn.Linear / Conv1D modules) to put MiLoRA on"
        )
    return best[1], best[2]


def layer_modules(layer: nn.Module, target_modules: Sequence[str] | str | None) -> list[str]:
    """Paths, relative to ``layer`` and in model order, of the modules MiLoRA adapts in it.

    ``None``: every ``nn.Linear`` / ``Conv1D``. A list of names: each matches a relative path equal to
    it or ending in ``"." + name`` (PEFT's rule); a name that matches nothing raises ValueError. A
    string: a full-match regex on the relative path (``"self_attn\\.(q|v)_proj"``).
    """
    linear = [p for p, m in layer.named_modules() if p and linear_features(m) is not None]
    if target_modules is None:
        return linear
    where = f"the decoder layer ({type(layer).__name__}: {linear})"
    if isinstance(target_modules, str):
        try:
            chosen = [p for p in linear if re.fullmatch(target_modules, p)]
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {e}") from None
        if not chosen:
            raise ValueError(f"target_modules {target_modules!r} matches no nn.Linear / Conv1D of {where}")
        return chosen
    if not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(
            f"target_modules must be None, a regex or a list of module names, got {target_modules!r}"
        )
    for t in target_modules:
        if not any(p == t or p.endswith("." + t) for p in linear):
            raise ValueError(f"target_modules: {t!r} matches no nn.Linear / Conv1D of {where}")
    return [p for p in linear if any(p == t or p.endswith("." + t) for t in target_modules)]


class _ModuleLoRA(nn.Module):
    """The factors of one adapted module, PEFT's layout and init: ``A [r, K]`` (Kaiming), ``B [N, r]`` (0)."""

    def __init__(self, in_features: int, out_features: int, r: int, device):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear (and PEFT) use


class _Pass:
    """State of one forward pass: the prompt mask and, per layer, the router outputs."""

    def __init__(self, mask: torch.Tensor | None, num_layers: int):
        self.mask = mask  # [B, T] bool, or None: every token of the layer input is prompt
        self.probs: list[torch.Tensor | None] = [None] * num_layers
        self.gates: list[torch.Tensor | None] = [None] * num_layers


class MiLoRA(nn.Module):
    """MiLoRA (arXiv 2410.18035) on a transformers model: per layer, the prompt picks ``top_k`` LoRA modules.

    Args:
        model: a transformers model; its parameters are frozen (restored by :meth:`remove`).
        r, lora_alpha: the rank and alpha of every LoRA module (scale ``lora_alpha / r``).
        target_modules: module names inside each decoder layer (``["q_proj", "v_proj"]``, PEFT's suffix
            rule), or a full-match regex on paths inside a layer; None: every ``nn.Linear`` / ``Conv1D``
            of the layer. Every layer must have the same modules.
        top_k: modules kept per layer and row, ``1..num_modules``.
        pooling: how the router reads the prompt: ``"attention"`` | ``"mean"`` | ``"max"`` | ``"last"``.
        balance_coef: weight of the load-balancing term added to ``out.loss`` (1e-2, as in the paper).

    ``mi(input_ids, attention_mask=..., labels=..., prompt_mask=...)`` runs the model; the routers pool
    only tokens where ``prompt_mask`` ``[B, T]`` is true (default: ``attention_mask``; without either,
    every token). ``out.loss`` (when the model returns one) includes ``balance_coef * balance_loss``.
    After it: ``mi.gates`` ``[B, num_layers, num_modules]`` (0 outside a row's top-k),
    ``mi.balance_loss`` (the mean over layers, before ``balance_coef``, differentiable: a model that
    returns no loss leaves adding ``balance_coef * mi.balance_loss`` to the caller).

    Example::

        mi = MiLoRA(model, r=8, lora_alpha=16, top_k=2)
        out = mi(input_ids, attention_mask=mask, labels=labels, prompt_mask=prompt_mask)
        out.loss.backward()
        mi.save("mi/")      # then dlp.attach(base_model, {"mi": "mi/"}) serves it
    """

    def __init__(
        self,
        model: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        target_modules: Sequence[str] | str | None = None,
        top_k: int = 2,
        pooling: str = "attention",
        *,
        balance_coef: float = 1e-2,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if (
            isinstance(lora_alpha, bool)
            or not isinstance(lora_alpha, (int, float))
            or not math.isfinite(lora_alpha)
        ):
            raise ValueError(f"lora_alpha must be a finite real number, got {lora_alpha!r}")
        if isinstance(balance_coef, bool) or not isinstance(balance_coef, (int, float)) or balance_coef < 0:
            raise ValueError(f"balance_coef must be a real number >= 0, got {balance_coef!r}")
        check_pooling(pooling)
        self.layers_path, layers = find_decoder_layers(model)
        self.module_names = layer_modules(layers[0], target_modules)
        check_top_k(top_k, len(self.module_names))
        for i, layer in enumerate(layers):
            missing = [m for m in self.module_names if _linear_or_none(layer, m) is None]
            if missing:
                raise ValueError(
                    f"decoder layer {self.layers_path}.{i} has no nn.Linear / Conv1D at {missing} "
                    "(every layer must have the modules of layer 0)"
                )
        self.model = model
        self.r, self.lora_alpha, self.top_k, self.pooling = r, float(lora_alpha), top_k, pooling
        self.balance_coef = float(balance_coef)
        self.scale = self.lora_alpha / r
        self.hidden_size = _hidden_size(model, layers[0])
        device = next(model.parameters()).device
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.lora = nn.ModuleList()
        for layer in layers:
            factors = nn.ModuleList()
            for m in self.module_names:
                K, N = linear_features(layer.get_submodule(m))
                factors.append(_ModuleLoRA(K, N, r, device))
            self.lora.append(factors)
        self.routers = nn.ModuleList(
            LayerRouter(self.hidden_size, len(self.module_names), top_k, pooling).to(device) for _ in layers
        )
        self.gates: torch.Tensor | None = None
        self.balance_loss: torch.Tensor | None = None
        self._pass: _Pass | None = None
        self._hooks = []
        for i, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            for j, m in enumerate(self.module_names):
                hook = self._module_hook(i, j)
                hook.milora_training_hook = True  # what dlp.attach looks for (milora_wrapped_modules)
                self._hooks.append(layer.get_submodule(m).register_forward_hook(hook))

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return len(self.lora)

    @property
    def num_modules(self) -> int:
        return len(self.module_names)

    @property
    def config(self):
        """The wrapped model's config (what transformers' Trainer reads)."""
        return getattr(self.model, "config", None)

    def module_paths(self, layer: int) -> list[str]:
        """Full module paths (as in ``model.named_modules()``) of layer ``layer``'s adapted modules."""
        return [f"{self.layers_path}.{layer}.{m}" for m in self.module_names]

    def num_trainable(self) -> int:
        """Trainable parameters: LoRA factors + routers (+ any base parameter the caller unfroze)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """Run the model with gated LoRA; see the class docstring. Returns the model's output."""
        if not self._hooks:
            raise RuntimeError("this MiLoRA was removed from its model; build a new one")
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if not isinstance(ref, torch.Tensor) or ref.dim() < 2:
            raise ValueError("MiLoRA needs input_ids [B, T] (or inputs_embeds [B, T, H])")
        mask = self._prompt_mask(prompt_mask, attention_mask, tuple(ref.shape[:2]))
        if labels is not None:
            kwargs["labels"] = labels
        self._pass = state = _Pass(mask, self.num_layers)
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._pass = None
        if any(g is None for g in state.gates):
            raise RuntimeError(
                f"only {sum(g is not None for g in state.gates)} of {self.num_layers} decoder layers ran"
            )
        self.gates = torch.stack([g.detach() for g in state.gates], dim=1)
        balance = torch.stack(
            [balance_loss(p, g, self.top_k) for p, g in zip(state.probs, state.gates)]
        ).mean()
        self.balance_loss = balance
        loss = getattr(out, "loss", None)
        if loss is not None:
            out.loss = loss + self.balance_coef * balance.to(loss.dtype)
        return out

    @staticmethod
    def _prompt_mask(prompt_mask, attention_mask, shape: tuple[int, int]) -> torch.Tensor | None:
        mask, name = (
            (prompt_mask, "prompt_mask") if prompt_mask is not None else (attention_mask, "attention_mask")
        )
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape {list(shape)}, got {type(mask).__name__}")
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"{name} must have the input's shape [B, T] = {list(shape)}, got {list(mask.shape)}"
            )
        mask = mask.bool()
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{name}: rows {empty} have no prompt token for the routers to pool")
        return mask

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                raise RuntimeError(f"decoder layer {i}: expected hidden states [B, T, H] as its first input")
            state = self._pass
            if state is None:  # the model called directly, not through MiLoRA: every token is prompt
                state = self._pass = _Pass(None, self.num_layers)
            mask = state.mask
            if mask is None or mask.shape != hidden.shape[:2]:
                mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            state.probs[i], state.gates[i] = self.routers[i](hidden, mask)
            return None

        return hook

    def _module_hook(self, i: int, j: int):
        lora = self.lora[i][j]
        conv = None

        def hook(module, args, output):
            nonlocal conv
            state = self._pass
            if state is None or state.gates[i] is None:
                raise RuntimeError(f"{self.module_paths(i)[j]} ran before its layer's router")
            x = args[0]
            gate = state.gates[i][:, j]
            if x.shape[0] != gate.shape[0]:
                raise RuntimeError(
                    f"{self.module_paths(i)[j]}: input {list(x.shape)} does not start with the batch of {gate.shape[0]}"
                )
            delta = (x.to(lora.lora_A.dtype) @ lora.lora_A.t()) @ lora.lora_B.t()
            gate = gate.view(-1, *([1] * (delta.dim() - 1)))
            return output + (self.scale * gate * delta).to(output.dtype)

        return hook

    # ------------------------------------------------------------------ life cycle
    def remove(self) -> None:
        """Take every hook off the model and restore its parameters' ``requires_grad``."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))

    def save(self, directory: str | os.PathLike) -> None:
        """Write PEFT LoRA files (PEFT loads them, gates off) + the routers + the MiLoRA config to ``directory``."""
        save_milora(self, directory)

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike) -> MiLoRA:
        """A MiLoRA on ``model`` with the LoRA factors and routers saved in ``directory`` (by :meth:`save`)."""
        return load_milora(cls, model, directory)


def milora_wrapped_modules(model: nn.Module) -> list[str]:
    """Paths of ``model``'s modules that carry a :class:`MiLoRA`'s training hook (its LoRA added to
    their output): not empty while a MiLoRA built on ``model`` has not been ``remove()``-d."""
    return [
        path
        for path, module in model.named_modules()
        if any(getattr(h, "milora_training_hook", False) for h in module._forward_hooks.values())
    ]


def _linear_or_none(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        return None
    return module if linear_features(module) is not None else None


def _hidden_size(model: nn.Module, layer: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if isinstance(size, int) and size > 0:
        return size
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    raise ValueError(f"{type(model).__name__}: cannot tell the hidden size (no config.hidden_size)")
