"""``dlplora demo``: SmolLM2-135M with the committed task adapters (default), or random weights (``--random``)."""

from .random_model import _device, run_demo

__all__ = ["run_demo", "_device"]
