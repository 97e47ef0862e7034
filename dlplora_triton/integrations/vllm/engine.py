"""Mixes inside vLLM's engine: slot accounting in the scheduler, checks on arrival, routes in the workers.

Installed by :func:`dlplora_triton.integrations.vllm.register` in every vLLM process (vLLM unchanged):

- **Arrival** (``EngineCore.preprocess_add_request``): a request carrying a mix
  (:mod:`~dlplora_triton.integrations.vllm.mixes`) is checked before it is queued: it carries this
  deployment's signature (so its adapter paths are the server's, not a client's), its components decode
  with weights in [-1000, 1000], its LoRA is the mix's anchor, it fits ``max_loras``, each component
  directory holds a LoRA within ``max_lora_rank`` (:func:`dlplora_triton.adapters.check_adapter_dir`,
  which reads a directory once until its files change). A bad one fails alone (vLLM answers that request
  with an error); the engine goes on.
- **Scheduling**: vLLM's scheduler counts one LoRA per request. A mix needs a slot per component, so
  the scheduler class vLLM picks is given a first pass that holds back, for this step, the waiting
  requests whose adapters would overflow the slots left by the running ones and the ones admitted before
  them (they stay queued in order and run when slots free up). A request held back for
  ``DLPLORA_MIX_PATIENCE`` steps (default 16) then reserves its slots, so one-adapter traffic cannot
  starve a mix (:mod:`~dlplora_triton.integrations.vllm.admission`). A mix of adapters that are already
  in slots costs nothing more.
- **Workers** (``set_active_loras`` of vLLM's LoRA model-runner mixin): the step's adapter set gains the
  mixes' components, and the punica wrapper gets each token's and each sampled row's
  ``(adapter, weight)`` list, so a mix's rows run ``sum_c w_c * LoRA_c(x)`` in the same kernel launch as
  every other row.
- **Metrics** (vLLM's per-LoRA request counts, ``vllm:lora_requests_info`` on ``/metrics``): a request
  under a mix name counts for each of its components, so the labels name the operator's adapters,
  never a client's weights, and their number stays bounded as with vLLM alone.
- **Start** (``EngineCore._initialize_kv_caches``): with LoRA enabled, every worker (each tensor,
  pipeline shard, on every node) is asked whether it runs the plugin; one that does not stops the
  engine before it serves (:mod:`~dlplora_triton.integrations.vllm.workers`).
"""

from __future__ import annotations

import logging

import numpy as np

from dlplora_triton.adapters import check_adapter_dir
from dlplora_triton.integrations.vllm.admission import admit, patience_from_env
from dlplora_triton.integrations.vllm.mixes import (
    MIX_ARG,
    MIX_SIGNATURE_ARG,
    LoRARouteMapping,
    parse_mix_name,
    request_mix,
    verify_mix_args,
)
from dlplora_triton.integrations.vllm.workers import check_workers

logger = logging.getLogger(__name__)
vllm_logger = logging.getLogger("vllm.dlplora")  # under vLLM's logger, so the engine's log shows it

_PATIENCE = patience_from_env()  # read once per process; a bad value stops vLLM at start, named

__all__ = ["check_mix_request", "install_engine_hooks", "lora_ids_of"]


def check_mix_request(sampling_params, lora_request, lora_config) -> None:
    """Raise ValueError (FileNotFoundError for a missing component) when a request's mix cannot be
    served; no-op for plain requests."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if MIX_ARG not in extra and MIX_SIGNATURE_ARG not in extra:
        return
    verify_mix_args(extra)
    mix = request_mix(sampling_params)  # decoded once per process, for the scheduler and workers too
    if lora_config is None:
        raise ValueError("a mix needs LoRA enabled (enable_lora=True / --enable-lora)")
    if (
        lora_request is None
        or lora_request.lora_int_id != mix[0].lora_int_id
        or lora_request.lora_path != mix[0].lora_path
    ):
        raise ValueError(
            "a mix request's LoRA must be its anchor (use mix_request, or the server's mix: names)"
        )
    if len(mix) > lora_config.max_loras:
        raise ValueError(
            f"the mix has {len(mix)} adapters; the engine holds at most {lora_config.max_loras} (max_loras)"
        )
    for c in mix:  # a directory checked before costs a few stat calls (dlplora_triton.adapters)
        check_adapter_dir(c.lora_path, lora_config.max_lora_rank, f"mix component {c.name!r}")


def lora_ids_of(request) -> frozenset[int]:
    """The LoRA ids a scheduler request needs in slots: its own and its mix's components (cached)."""
    cached = getattr(request, "_dlplora_lora_ids", None)
    if cached is not None:
        return cached
    ids = set()
    if request.lora_request is not None and request.lora_request.lora_int_id > 0:
        ids.add(request.lora_request.lora_int_id)
    mix = request_mix(request.sampling_params) if request.sampling_params is not None else None
    if mix:
        ids.update(c.lora_int_id for c in mix)
    ids = frozenset(ids)
    try:
        request._dlplora_lora_ids = ids
    except AttributeError:  # a Request with __slots__: recompute next time
        pass
    return ids


class MixSlotsScheduler:
    """Mixed in before vLLM's scheduler class: admit waiting requests only while their adapters fit,
    and keep room for a request held back too long (:mod:`~dlplora_triton.integrations.vllm.admission`)."""

    def schedule(self, *args, **kwargs):
        lora_config = getattr(self, "lora_config", None)
        if not lora_config:
            return super().schedule(*args, **kwargs)
        waited = getattr(self, "_dlplora_waited", None)
        if waited is None:
            waited = self._dlplora_waited = {}  # request id -> steps held back by this hook
        held: set[int] = set()
        for request in self.running:
            held |= lora_ids_of(request)
        order = list(self.waiting)
        decision = admit(
            held,
            [(i, lora_ids_of(r), waited.get(r.request_id, 0)) for i, r in enumerate(order)],
            lora_config.max_loras,
            _PATIENCE,
        )
        deferred = [order[i] for i in decision.held_back]
        for request in deferred:
            waited[request.request_id] = waited.get(request.request_id, 0) + 1
        if deferred:
            self.waiting.remove_requests(deferred)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            rest = list(self.waiting)
            if deferred:
                # Back into the queue in their first order, with whatever this step did not admit.
                position = {id(r): i for i, r in enumerate(order)}
                self.waiting.remove_requests(rest)
                rest = sorted(rest + deferred, key=lambda r: position.get(id(r), len(order)))
                for request in rest:
                    self.waiting.add_request(request)
            if waited:  # forget the requests that left the queue (admitted, aborted)
                still = {r.request_id for r in rest}
                for request_id in [k for k in waited if k not in still]:
                    del waited[request_id]


_SCHEDULERS: dict[type, type] = {}


def mix_slots_scheduler(base: type) -> type:
    """``base`` (vLLM's Scheduler or AsyncScheduler, or a user's) with mix-aware slot accounting."""
    if issubclass(base, MixSlotsScheduler):
        return base
    if base not in _SCHEDULERS:
        _SCHEDULERS[base] = type(f"DLPLoRA{base.__name__}", (MixSlotsScheduler, base), {})
    return _SCHEDULERS[base]


def _rows(mixes, lora_ids, counts) -> LoRARouteMapping:
    """Per-row ``(LoRA id, weight)`` lists of a batch, each request's row repeated ``counts[i]`` times."""
    width = max([len(m) for m in mixes if m] + [1])
    ids = np.zeros((len(mixes), width), dtype=np.int64)
    weights = np.zeros((len(mixes), width), dtype=np.float32)
    for i, (mix, lora_id) in enumerate(zip(mixes, lora_ids)):
        if mix:
            ids[i, : len(mix)] = [c.lora_int_id for c in mix]
            weights[i, : len(mix)] = [c.weight for c in mix]
        elif lora_id > 0:
            ids[i, 0], weights[i, 0] = lora_id, 1.0
    counts = np.asarray(counts, dtype=np.int64)
    return LoRARouteMapping(np.repeat(ids, counts, axis=0), np.repeat(weights, counts, axis=0))


def _component_names(lora_name) -> list[str] | None:
    """The adapters of a mix name (``mix:de=0.7,code=0.3`` -> ``["de", "code"]``), None for other names."""
    try:
        pairs = parse_mix_name(lora_name)
    except ValueError:
        return None
    return None if pairs is None else [name for name, _ in pairs]


def install_engine_hooks() -> bool:
    """Install the hooks (idempotent); True when installed by this call."""
    from vllm.config.scheduler import SchedulerConfig
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.metrics.stats import LoRARequestStates
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    from dlplora_triton.integrations.vllm.wrapper import next_step_routes

    if getattr(LoRAModelRunnerMixin.set_active_loras, "_dlplora", False):
        return False
    get_scheduler_cls = SchedulerConfig.get_scheduler_cls
    preprocess = EngineCore.preprocess_add_request
    set_active_loras = LoRAModelRunnerMixin.set_active_loras
    lora_update = LoRARequestStates._request_update
    initialize_kv_caches = EngineCore._initialize_kv_caches

    def check_workers_then_initialize_kv_caches(self, vllm_config):
        # Every worker has loaded the model by now; one without the plugin must stop the engine
        # before it serves (workers.py says why).
        if vllm_config.lora_config is not None:
            states = check_workers(self.model_executor.collective_rpc)
            vllm_logger.info("dlplora: the plugin runs in all %d vLLM workers", len(states))
        return initialize_kv_caches(self, vllm_config)

    def get_mix_scheduler_cls(self):
        return mix_slots_scheduler(get_scheduler_cls(self))

    def preprocess_add_request(self, request):
        check_mix_request(request.sampling_params, request.lora_request, self.vllm_config.lora_config)
        return preprocess(self, request)

    def set_active_mixes(self, input_batch, num_scheduled_tokens, num_sampled_tokens=None, *args, **kwargs):
        num_reqs = input_batch.num_reqs
        params = [self.requests[rid].sampling_params for rid in input_batch.req_ids[:num_reqs]]
        mixes = [request_mix(p) if p is not None else None for p in params]
        manager = self.lora_manager._adapter_manager
        if not any(mixes):
            if getattr(manager, "_dlplora_mixed", False):  # the last step's routes must not linger
                manager._last_mapping, manager._dlplora_mixed = None, False
            return set_active_loras(
                self, input_batch, num_scheduled_tokens, num_sampled_tokens, *args, **kwargs
            )
        if num_sampled_tokens is None:
            num_sampled_tokens = np.ones_like(num_scheduled_tokens, dtype=np.int32)
        prompt_mapping, token_mapping, lora_requests = input_batch.make_lora_inputs(
            num_scheduled_tokens, num_sampled_tokens
        )
        requested = {r.lora_int_id: r for r in lora_requests if r}
        for mix in mixes:
            for c in mix or ():
                requested.setdefault(c.lora_int_id, LoRARequest(c.name, c.lora_int_id, c.lora_path))
        lora_ids = input_batch.request_lora_mapping[:num_reqs].tolist()
        tokens = _rows(mixes, lora_ids, num_scheduled_tokens[:num_reqs])
        samples = _rows(mixes, lora_ids, num_sampled_tokens[:num_reqs])
        manager._last_mapping, manager._dlplora_mixed = None, True  # routes change with weights alone
        with next_step_routes(tokens, samples):
            # A list, not a set: LoRARequest hashes by name, and a mix's anchor shares its first
            # component's id under another name (vLLM's manager keys by id).
            return self._set_active_loras(
                prompt_mapping, token_mapping, list(requested.values()), *args, **kwargs
            )

    def request_update(self, req_id, lora_name, waiting, running):
        names = _component_names(lora_name)
        if names is None:
            return lora_update(self, req_id, lora_name, waiting, running)
        for name in names:
            lora_update(self, req_id, name, waiting, running)

    request_update._dlplora = True
    check_workers_then_initialize_kv_caches._dlplora = True
    EngineCore._initialize_kv_caches = check_workers_then_initialize_kv_caches
    LoRARequestStates._request_update = request_update
    get_mix_scheduler_cls._dlplora = True
    set_active_mixes._dlplora = True
    SchedulerConfig.get_scheduler_cls = get_mix_scheduler_cls
    EngineCore.preprocess_add_request = preprocess_add_request
    LoRAModelRunnerMixin.set_active_loras = set_active_mixes
    return True
