"""PEFT adapters for the model-level tests."""

import copy
import warnings

import torch
from torch import nn


def save_adapter(
    base: nn.Module, path, seed: int = 0, safe: bool = True, scale: float = 1.0, **config
) -> str:
    """A PEFT LoRA adapter of ``base`` with random A and B (PEFT initialises B to zero: the adapter
    would do nothing) of standard deviation ``scale``, saved to ``path``; returns the path."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    model.save_pretrained(str(path), safe_serialization=safe)
    return str(path)
