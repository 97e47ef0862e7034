"""Every vLLM worker must run the plugin: the engine core asks each one before it serves anything.

With tensor, pipeline or data parallelism vLLM starts one worker process per shard (``mp`` executor) or
one Ray actor per shard, possibly on other machines, and each loads the plugins it finds in its own
Python. A worker without this plugin would run vLLM's own punica wrapper: it would serve a mix's
anchor alone, with no error, on its shard only. So the engine core, which runs the plugin, asks every
worker through vLLM's ``collective_rpc`` which punica wrapper its model holds and whether the mix hooks
are installed there, after the workers have loaded the model and before the KV cache is set up; any
other answer stops the engine with one line naming the workers (docs/vllm.md, "Several workers").
"""

from __future__ import annotations

__all__ = ["check_workers", "worker_plugin_state"]


def worker_plugin_state(worker) -> dict:
    """Run inside a vLLM worker (sent by ``collective_rpc``): its rank, host, and whether its model's
    LoRA layers call this package's wrapper and the mix hooks are installed.

    It reads vLLM's state only, so a worker that has the package but did not register the plugin
    answers with what it lacks; one without the package cannot unpickle it, which
    :func:`check_workers` reports as well.
    """
    import os
    import socket

    from vllm.platforms import current_platform
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    runner = getattr(worker, "model_runner", None)
    manager = getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)
    wrappers = sorted({type(w).__name__ for w in getattr(manager, "punica_wrapper_mapping", {}).values()})
    return {
        "rank": getattr(worker, "rank", None),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "wrappers": wrappers,
        "platform_hook": bool(getattr(type(current_platform).get_punica_wrapper, "_dlplora", False)),
        "mix_hook": bool(getattr(LoRAModelRunnerMixin.set_active_loras, "_dlplora", False)),
    }


def _missing(state: dict) -> str | None:
    """What a worker's state lacks (None when the plugin runs there)."""
    lacks = []
    if not state.get("platform_hook") or not state.get("mix_hook"):
        lacks.append("the plugin was not registered (VLLM_PLUGINS or dlplora-triton missing)")
    if state.get("wrappers") and state["wrappers"] != ["PunicaWrapperDLP"]:
        lacks.append(f"its LoRA layers use {'/'.join(state['wrappers'])}")
    return "; ".join(lacks) or None


def check_workers(collective_rpc) -> list[dict]:
    """Ask every worker (``collective_rpc(worker_plugin_state)``); raise RuntimeError, one line naming
    each worker that does not run the plugin. Returns the workers' states."""
    try:
        states = collective_rpc(worker_plugin_state)
    except Exception as error:  # e.g. a worker that cannot import this package at all
        message = str(error).strip().splitlines()
        raise RuntimeError(
            "dlplora: a vLLM worker could not run the plugin check ("
            f"{type(error).__name__}: {message[-1] if message else ''}); install dlplora-triton in "
            "every node's Python (docs/vllm.md, 'Several workers')"
        ) from error
    bad = [(s, why) for s in states if (why := _missing(s))]
    if bad:
        named = ", ".join(f"rank {s['rank']} (pid {s['pid']} on {s['host']}): {why}" for s, why in bad)
        raise RuntimeError(
            f"dlplora: {len(bad)} of {len(states)} vLLM workers do not run the plugin, so they would "
            f"serve mixes wrong: {named}. Install dlplora-triton in every node's Python and keep "
            "'dlplora' in VLLM_PLUGINS there (docs/vllm.md, 'Several workers')"
        )
    return states
