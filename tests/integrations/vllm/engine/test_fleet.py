"""A fleet of 32 adapters behind vLLM's OpenAI server with the plugin: S-LoRA's workload, with mixes.

The fleet comes from bench/make_fleet.py (ranks 4-64, attention / MLP / all-linear targets, some with a
rank_pattern), loaded on first use from ``$DLPLORA_VLLM_ADAPTER_DIR`` by the mix middleware. The server
holds 4 adapters in slots and 8 in its host cache, so adapters are loaded and evicted all along:

- 200 requests from 16 closed-loop clients, Zipf popularity (alpha 1): 60% one adapter, 30% mixes of
  2-3, 10% the base model. Every one answered; a seeded sample equal to transformers + PEFT serving it
  alone; loads and evictions counted on ``/metrics``.
- The adversarial sequence: 16 clients keep four other adapters busy without a pause, so some of them
  always hold the slots a mix of three needs. The scheduler hook's reservation
  (integrations/vllm/admission.py) must get the mix in while that traffic goes on; without it the mix
  waits until the traffic stops (checked by hand with ``DLPLORA_MIX_PATIENCE=1000000``).
"""

import random
import sys
import threading
import time
from pathlib import Path

import pytest
from engine_util import ROOT, assert_matches, greedy_alone, model_folder, serve_for_module, server_args

sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # peft_helpers: the model-level tests' PEFT oracle
from fleet_traffic import draw_routes, percentile, route_class, run_clients  # noqa: E402

COUNT, SLOTS, CPU_LORAS = 32, 4, 8
REQUESTS, CLIENTS, MAX_TOKENS = 200, 16, 4
MIDDLEWARE = "dlplora_triton.integrations.vllm.server.MixMiddleware"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from make_fleet import write_fleet

    return write_fleet(tmp_path_factory.mktemp("fleet"), COUNT, seed=0)


@pytest.fixture(scope="module")
def server(fleet, tmp_path_factory, request):
    root = tmp_path_factory.mktemp("fleet_server")
    args = server_args(
        "--max-cpu-loras",
        str(CPU_LORAS),
        "--middleware",
        MIDDLEWARE,
        max_loras=SLOTS,
        max_lora_rank=max(a["max_rank"] for a in fleet),
        lora_modules=(),
    )
    env = {"DLPLORA_VLLM_ADAPTER_DIR": str(Path(fleet[0]["path"]).parent)}
    yield from serve_for_module(request, root / "server.log", args, env=env)


@pytest.fixture(scope="module")
def names(fleet):
    return [a["name"] for a in fleet]


def peft_reference(fleet, routes):
    """transformers + PEFT with the adapters ``routes`` use: each route's greedy answer, alone."""
    import torch
    from peft_helpers import PeftOracle
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    paths = {a["name"]: a["path"] for a in fleet}
    used = sorted({name for route in routes for name, _ in route})
    base = AutoModelForCausalLM.from_pretrained(str(model_folder()), dtype=torch.float32).eval()
    return PeftOracle(base, {name: paths[name] for name in used})


def counter(metrics: str, name: str) -> float:
    """The value of ``name`` (with its labels, as printed) on a ``/metrics`` page."""
    for line in metrics.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not on /metrics")


def test_zipf_traffic_with_mixes_is_served_right(server, client, fleet, names, prompts):
    routes = draw_routes(names, REQUESTS, alpha=1.0, seed=0)
    outcomes = run_clients(client, routes, prompts, CLIENTS, MAX_TOKENS, base="smollm2")
    failed = [(o.index, o.route, o.error) for o in outcomes if o.error]
    assert not failed, f"{len(failed)} of {REQUESTS} requests failed, first: {failed[:3]}"
    assert len(outcomes) == REQUESTS and all(len(o.tokens) == MAX_TOKENS for o in outcomes)
    assert server.alive()

    # A seeded sample, every class in it, against transformers + PEFT serving each request alone.
    rng = random.Random(1)
    by_class = {c: [o for o in outcomes if route_class(o.route) == c] for c in ("one", "mix", "base")}
    sample = rng.sample(by_class["one"], 4) + rng.sample(by_class["mix"], 4) + rng.sample(by_class["base"], 1)
    oracle = peft_reference(fleet, [o.route for o in sample])
    for o in sample:
        ref = greedy_alone(oracle, prompts[o.index % len(prompts)], o.route, MAX_TOKENS)
        assert_matches(o.tokens, o.logprobs, ref, f"request {o.index} {o.route}")

    # More adapters were used than the host cache holds: loads and evictions, counted.
    metrics = server.metrics()
    used = len({name for route in routes for name, _ in route})
    loads = counter(metrics, "dlplora_adapter_loads_total")
    assert loads >= used > CPU_LORAS
    evicted_cpu = counter(metrics, 'dlplora_adapter_evictions_total{cache="cpu"}')
    evicted_slots = counter(metrics, 'dlplora_adapter_evictions_total{cache="slots"}')
    # Every adapter past the host cache's size pushed one out. Not `loads - CPU_LORAS`: a load need not
    # end in the cache (one run under load counted 253 loads and 241 evictions, the cache holding 8).
    assert loads >= evicted_cpu >= used - CPU_LORAS and evicted_slots > 0
    assert counter(metrics, "dlplora_adapter_activations_total") >= used


def test_a_mix_is_not_starved_by_one_adapter_traffic(server, client, fleet, names, prompts):
    busy = names[:4]  # the four hottest, never in the mix
    mix = ((names[20], 0.5), (names[21], 0.3), (names[22], 0.2))
    stream = [((busy[i % 4], 1.0),) for i in range(600)]
    # Lengths drawn at random: requests of one length would end together and leave the slots empty
    # for a step now and then, which lets a mix in by luck.
    lengths = [random.Random(i).randint(2, 16) for i in range(len(stream))]
    mix_done = threading.Event()
    stop_after = []  # the stream runs on a little after the mix, then stops

    def stop():
        if mix_done.is_set() and not stop_after:
            stop_after.append(time.monotonic() + 2.0)
        return bool(stop_after) and time.monotonic() > stop_after[0]

    results = {}

    def traffic():
        results["stream"] = run_clients(client, stream, prompts, CLIENTS, lengths, base="smollm2", stop=stop)

    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(3.0)  # the busy adapters hold the slots
    mix_outcome = run_clients(client, [mix], prompts[1:2], 1, MAX_TOKENS, base="smollm2")[0]
    mix_done.set()
    thread.join()
    outcomes = results["stream"]
    assert mix_outcome.error is None, mix_outcome.error
    assert all(o.error is None for o in outcomes)
    # The traffic went on after the mix (the mix did not wait for it to end) ...
    after = [o for o in outcomes if o.sent > mix_outcome.done]
    assert after and len(outcomes) < len(stream), (
        f"the mix waited {mix_outcome.latency:.1f} s, until the one-adapter traffic ran out"
    )
    # ... and it waited about as long as the requests around it.
    one_p99 = percentile([o.latency for o in outcomes], 0.99)
    print(f"mix {mix_outcome.latency:.2f} s, one-adapter p99 {one_p99:.2f} s, {len(outcomes)} sent")
    assert mix_outcome.latency < 3 * one_p99 + 1.0, (mix_outcome.latency, one_p99)
    oracle = peft_reference(fleet, [mix])
    ref = greedy_alone(oracle, prompts[1], mix, MAX_TOKENS)
    assert_matches(mix_outcome.tokens, mix_outcome.logprobs, ref, f"mix {mix}")
    assert server.alive()
