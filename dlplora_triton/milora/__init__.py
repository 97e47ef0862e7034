"""MiLoRA (arXiv 2410.18035): per-layer routers pick which LoRA modules of the layer the prompt uses.

- :class:`MiLoRA` trains the LoRA factors and routers together on a transformers model
  (``model.py``; routers, pooling and the balance loss in ``routers.py``);
- ``mi.save(dir)`` writes PEFT LoRA files + routers + config (``files.py``);
- ``dlp.attach(model, {"mi": dir})`` serves it on the fused path, gates computed once per request at
  prefill (``serving.py``). The math and the experiment: docs/milora.md.
"""

from .files import MiLoRAConfig, is_milora_dir, read_config
from .model import MiLoRA, find_decoder_layers
from .routers import POOLINGS, LayerRouter, balance_loss
from .serving import MiServing, prepare_milora

__all__ = [
    "MiLoRA",
    "MiLoRAConfig",
    "LayerRouter",
    "MiServing",
    "POOLINGS",
    "balance_loss",
    "find_decoder_layers",
    "is_milora_dir",
    "prepare_milora",
    "read_config",
]
