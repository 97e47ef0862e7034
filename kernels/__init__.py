"""Triton kernels of dlplora_triton (imported as ``dlplora_triton.kernels``).

Only ``@triton.jit`` kernels, their launchers and their block-shape choices live here: no nn.Module,
no transformers. Launchers take plain tensors and integers (the fields of a plan), never a plan
object, so this package imports nothing above it.

This folder sits at the top of the checkout, so whenever the checkout's root is on ``sys.path``
(``python -m pytest`` or ``python -c`` run from it) ``import kernels`` finds it first, and Hugging
Face's ``kernels`` distribution (which transformers >= 5.25 imports) would be shadowed. Imported
under that top-level name, this file therefore steps aside: it loads the installed distribution that
owns ``kernels`` in its own place or, when none is installed, leaves an empty namespace package (what
Python makes of a folder without ``__init__.py``: no ``__file__``, no version, nothing in it), which
transformers' availability check reads as "not installed".
"""

if __name__ == "kernels":  # reached through the checkout's root on sys.path, not as ours
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _installed_kernels_spec():
        """The spec ``import kernels`` would find if the checkout's root were not on sys.path."""
        root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
        path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != root]
        for finder in _sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec("kernels", path) if find_spec is not None else None
            if spec is not None and spec.origin != __file__:
                return spec
        return None

    _spec = _installed_kernels_spec()
    if _spec is None:  # an empty namespace package
        _spec = _machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = []
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
else:
    from .configs import expand_config, shrink_config
    from .lora_expand import lora_expand_launch
    from .lora_shrink import lora_shrink_launch

    __all__ = ["lora_shrink_launch", "lora_expand_launch", "shrink_config", "expand_config"]
