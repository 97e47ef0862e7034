"""Backends that serve a plan: the PyTorch path (the CPU default); the Triton kernels live in ``kernels/``."""

from .torch_path import TorchPathCache, fused_lora_torch

__all__ = ["TorchPathCache", "fused_lora_torch"]
