"""Triton kernels of dlplora_triton (imported as ``dlplora_triton.kernels``).

Only ``@triton.jit`` kernels, their launchers and their block-shape choices live here: no nn.Module,
no transformers. Launchers take plain tensors and integers (the fields of a plan), never a plan
object, so this package imports nothing above it.
"""

from .configs import expand_config, shrink_config
from .lora_expand import lora_expand_launch
from .lora_shrink import lora_shrink_launch

__all__ = ["lora_shrink_launch", "lora_expand_launch", "shrink_config", "expand_config"]
