"""The engine core's question to every vLLM worker (integrations/vllm/workers.py), without an engine:
the answers of workers that run the plugin, that do not, and that cannot unpickle the question."""

import pytest

from dlplora_triton.integrations.vllm.workers import check_workers


def _state(rank, **changes):
    state = dict(
        rank=rank,
        host="node-a",
        pid=1000 + rank,
        wrappers=["PunicaWrapperDLP"],
        platform_hook=True,
        mix_hook=True,
    )
    return dict(state, **changes)


def test_workers_that_run_the_plugin_pass():
    states = [_state(0), _state(1)]
    assert check_workers(lambda method: states) == states


def test_one_worker_without_the_plugin_stops_the_engine_in_one_line():
    states = [
        _state(0),
        _state(1, host="node-b", wrappers=["PunicaWrapperCPU"], platform_hook=False, mix_hook=False),
    ]
    with pytest.raises(RuntimeError) as raised:
        check_workers(lambda method: states)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("dlplora: 1 of 2 vLLM workers do not run the plugin")
    assert "rank 1 (pid 1001 on node-b)" in message and "PunicaWrapperCPU" in message
    assert "rank 0" not in message


def test_a_wrapper_replaced_after_registration_is_named():
    # The hooks are there but another plugin (or vLLM) chose the layers' wrapper.
    with pytest.raises(RuntimeError, match="rank 0 .*its LoRA layers use PunicaWrapperGPU"):
        check_workers(lambda method: [_state(0, wrappers=["PunicaWrapperGPU"])])


def test_a_worker_that_cannot_import_the_package_stops_the_engine():
    def collective_rpc(method):
        raise RuntimeError("Worker failed with error 'No module named 'dlplora_triton''")

    with pytest.raises(RuntimeError, match="could not run the plugin check .*No module named") as raised:
        check_workers(collective_rpc)
    assert "\n" not in str(raised.value)
