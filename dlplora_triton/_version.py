"""The package version: the one source that pyproject.toml and ``dlplora_triton.__version__`` read."""

__version__ = "0.2.0.dev0"
