"""A MiLoRA directory: PEFT LoRA files at the top level, plus the layer routers and a MiLoRA config.

    adapter_config.json          PEFT's LoRA config (r, lora_alpha, target_modules as a full-match regex)
    adapter_model.safetensors    base_model.model.<module path>.lora_{A,B}.weight, PEFT's names and layout
    milora_config.json           {"format": "dlplora-milora", "layers_path", "modules", "top_k", ...}
    milora_routers.safetensors   layers.<i>.{query, act.beta, proj.weight} of each layer's router

PEFT's ``PeftModel.from_pretrained`` loads the first two (the LoRA with every gate at 1);
``dlp.attach`` recognises the directory by ``milora_config.json`` and serves it with its gates.
Reading checks everything and raises FileNotFoundError / ValueError naming the file.

``MiLoRA.save`` / ``MiLoRA.load`` (:mod:`.model`) run :func:`save_milora` / :func:`load_milora`, which
take the MiLoRA or its class: this module does not import :mod:`.model`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..modules import is_conv1d
from ..readers import read_json_object, read_safetensors
from .routers import POOLINGS, LayerRouter

__all__ = ["MiLoRAConfig", "is_milora_dir", "read_config", "load_routers", "save_milora", "load_milora"]

FORMAT = "dlplora-milora"
CONFIG_NAME = "milora_config.json"
ROUTERS_NAME = "milora_routers.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class MiLoRAConfig:
    """What ``milora_config.json`` holds."""

    layers_path: str  # the decoder-layer list, e.g. "model.layers"
    num_layers: int
    modules: tuple[str, ...]  # module paths relative to a layer, e.g. ("self_attn.q_proj", ...)
    hidden_size: int
    top_k: int
    pooling: str
    r: int
    lora_alpha: float
    balance_coef: float

    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            "layers_path": self.layers_path,
            "num_layers": self.num_layers,
            "modules": list(self.modules),
            "hidden_size": self.hidden_size,
            "top_k": self.top_k,
            "pooling": self.pooling,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "balance_coef": self.balance_coef,
        }

    def module_paths(self, layer: int) -> list[str]:
        return [f"{self.layers_path}.{layer}.{m}" for m in self.modules]


def is_milora_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding ``milora_config.json``."""
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_NAME))


def _target_regex(layers_path: str, modules) -> str:
    names = "|".join(re.escape(m) for m in modules)
    return rf"{re.escape(layers_path)}\.\d+\.(?:{names})"


def _uses_conv1d(mi) -> bool:
    """Whether ``mi``'s adapted modules are GPT-2 ``Conv1D`` (PEFT's ``fan_in_fan_out``)."""
    return any(is_conv1d(mi.model.get_submodule(p)) for p in mi.module_paths(0))


def save_milora(mi, directory: str | os.PathLike) -> Path:
    """Write ``mi`` (a :class:`~dlplora_triton.milora.MiLoRA`) to ``directory`` (created if missing)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = MiLoRAConfig(
        mi.layers_path,
        mi.num_layers,
        tuple(mi.module_names),
        mi.hidden_size,
        mi.top_k,
        mi.pooling,
        mi.r,
        mi.lora_alpha,
        mi.balance_coef,
    )
    model_config = getattr(mi.model, "config", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "r": mi.r,
        "lora_alpha": mi.lora_alpha,
        "target_modules": _target_regex(mi.layers_path, mi.module_names),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": _uses_conv1d(mi),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    weights, routers = {}, {}
    for i in range(mi.num_layers):
        for path, lora in zip(mi.module_paths(i), mi.lora[i]):
            weights[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = lora.lora_A.detach().float().cpu().contiguous()
            weights[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = lora.lora_B.detach().float().cpu().contiguous()
        for name, p in mi.routers[i].state_dict().items():
            routers[f"layers.{i}.{name}"] = p.detach().float().cpu().contiguous()
    save_file(weights, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    save_file(routers, str(out / ROUTERS_NAME), metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    (out / CONFIG_NAME).write_text(json.dumps(config.as_dict(), indent=2) + "\n")
    return out


def _owner(path: Path) -> str:
    return f"MiLoRA directory {str(path.parent)!r}"


def _read_json(path: Path) -> dict:
    return read_json_object(path, _owner(path))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, _owner(path))


def read_config(directory: str | os.PathLike) -> MiLoRAConfig:
    """The validated ``milora_config.json`` of ``directory`` (FileNotFoundError / ValueError naming it)."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no such MiLoRA directory: {str(directory)!r}")
    path = directory / CONFIG_NAME
    data = _read_json(path)

    def field(key, check, what):
        value = data.get(key)
        if not check(value):
            raise ValueError(f"{path}: {key} must be {what}, got {value!r}")
        return value

    def pos_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT!r}, got {data.get('format')!r}")
    modules = field(
        "modules",
        lambda v: isinstance(v, list) and v and all(isinstance(m, str) and m for m in v),
        "a list of names",
    )
    config = MiLoRAConfig(
        layers_path=field("layers_path", lambda v: isinstance(v, str), "a module path"),
        num_layers=field("num_layers", pos_int, "a positive integer"),
        modules=tuple(modules),
        hidden_size=field("hidden_size", pos_int, "a positive integer"),
        top_k=field("top_k", lambda v: pos_int(v) and v <= len(modules), f"an integer in 1..{len(modules)}"),
        pooling=field("pooling", lambda v: v in POOLINGS, f"one of {list(POOLINGS)}"),
        r=field("r", pos_int, "a positive integer"),
        lora_alpha=float(field("lora_alpha", real, "a real number")),
        balance_coef=float(field("balance_coef", lambda v: real(v) and v >= 0, "a real number >= 0")),
    )
    return config


def _check_layers(config: MiLoRAConfig, model: nn.Module, where: Path) -> nn.ModuleList:
    try:
        layers = model.get_submodule(config.layers_path) if config.layers_path else model
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList) or len(layers) != config.num_layers:
        found = (
            "nothing"
            if layers is None
            else f"{type(layers).__name__} of {len(layers) if isinstance(layers, nn.ModuleList) else '?'}"
        )
        raise ValueError(
            f"{where}: the model has no list of {config.num_layers} decoder layers at "
            f"{config.layers_path!r} (found {found}); was it saved for another model?"
        )
    return layers


def load_routers(directory: str | os.PathLike, model: nn.Module) -> tuple[MiLoRAConfig, list[LayerRouter]]:
    """The config and the float32 routers of a MiLoRA directory, checked against ``model``."""
    directory = Path(directory)
    config = read_config(directory)
    _check_layers(config, model, directory / CONFIG_NAME)
    path = directory / ROUTERS_NAME
    tensors = _read_tensors(path)
    routers = []
    for i in range(config.num_layers):
        router = LayerRouter(config.hidden_size, len(config.modules), config.top_k, config.pooling)
        expected = router.state_dict()
        state = {}
        for name, ref in expected.items():
            key = f"layers.{i}.{name}"
            t = tensors.pop(key, None)
            if t is None:
                raise ValueError(f"{path}: missing tensor {key!r} (layer {i}'s {config.pooling} router)")
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{path}: {key!r} has shape {list(t.shape)}, expected {list(ref.shape)} "
                    f"(hidden {config.hidden_size}, {len(config.modules)} modules in {CONFIG_NAME})"
                )
            state[name] = t.float()
        router.load_state_dict(state)
        routers.append(router)
    if tensors:
        raise ValueError(f"{path}: unexpected tensors {sorted(tensors)[:4]} (not in {CONFIG_NAME}'s layout)")
    return config, routers


def load_milora(cls, model: nn.Module, directory: str | os.PathLike):
    """``cls(model, ...)`` with the config, LoRA factors and routers of ``directory``."""
    directory = Path(directory)
    config, routers = load_routers(directory, model)
    peft_config = _read_json(directory / PEFT_CONFIG)
    if peft_config.get("r") != config.r or float(peft_config.get("lora_alpha", "nan")) != config.lora_alpha:
        raise ValueError(
            f"{directory / PEFT_CONFIG}: r / lora_alpha ({peft_config.get('r')!r}, {peft_config.get('lora_alpha')!r}) "
            f"differ from {CONFIG_NAME}'s ({config.r}, {config.lora_alpha:g})"
        )
    exact = "(?:" + "|".join(re.escape(m) for m in config.modules) + ")"
    try:
        mi = cls(
            model,
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=exact,
            top_k=config.top_k,
            pooling=config.pooling,
            balance_coef=config.balance_coef,
        )
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_NAME}: does not fit the model: {e}") from None
    if (mi.layers_path, tuple(mi.module_names), mi.hidden_size) != (
        config.layers_path,
        config.modules,
        config.hidden_size,
    ):
        found = (mi.layers_path, mi.module_names, mi.hidden_size)
        mi.remove()
        raise ValueError(
            f"{directory / CONFIG_NAME}: layers {config.layers_path!r}, modules {list(config.modules)}, hidden "
            f"{config.hidden_size} do not match the model's {found}"
        )
    weights_path = directory / PEFT_WEIGHTS
    tensors = _read_tensors(weights_path)
    with torch.no_grad():
        for i in range(config.num_layers):
            mi.routers[i].load_state_dict(routers[i].state_dict())
            for path, lora in zip(mi.module_paths(i), mi.lora[i]):
                for part, param in (("lora_A", lora.lora_A), ("lora_B", lora.lora_B)):
                    key = f"{_PEFT_PREFIX}{path}.{part}.weight"
                    t = tensors.get(key)
                    if t is None or tuple(t.shape) != tuple(param.shape):
                        mi.remove()
                        got = "missing" if t is None else f"shape {list(t.shape)}"
                        raise ValueError(f"{weights_path}: {key!r} is {got}, expected {list(param.shape)}")
                    param.copy_(t)
    return mi
