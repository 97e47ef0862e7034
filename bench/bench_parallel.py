"""Throughput at tensor parallelism 2 (vLLM's CPU build, ``mp`` executor): our plugin against vLLM as shipped.

Two OpenAI servers, each with two worker processes (``--tensor-parallel-size 2``, one CPU bound to each
worker by ``VLLM_CPU_OMP_THREADS_BIND``): vLLM as shipped (``VLLM_PLUGINS=none``: its CPU punica
wrapper) and vLLM with this package's plugin and mix middleware. Both serve the engine tests' small
Llama (tests/integrations/vllm/engine/parallel_util.py: 4 query and 2 key/value heads, so it splits in
two; SmolLM2-135M's 9 and 3 do not) with its four adapters and ``--max-loras 4``. The workload is one
adapter per request (all four, seeded prompts and lengths), ``--requests`` requests sent by
``--clients`` concurrent clients; rounds alternate the two servers. Every response is checked against
transformers + PEFT serving that request alone (greedy tokens, log-probs within 1e-4).

    .venv-engine/bin/python bench/bench_parallel.py [--clients 8] [--requests 32] [--rounds 3]

Reported per round and server: requests/s, output tokens/s, p50/p99 latency, the 1-minute load average
before the run (the machine's other processes); then ours/vLLM per round and their median.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integrations" / "vllm" / "engine"))  # the engine tests' helpers

from bench_serve import check, run  # noqa: E402
from engine_util import Server  # noqa: E402
from parallel_util import TINY_RANK, TinyReference, bind_threads, build_tiny_llama  # noqa: E402

MIDDLEWARE = "dlplora_triton.integrations.vllm.server.MixMiddleware"
ADAPTERS = ("a", "b", "c", "a_flipped")
LENGTHS = (8, 16, 24)


def server_args(model_dir: Path, adapters: dict[str, Path], ours: bool) -> list[str]:
    args = ["--model", str(model_dir), "--served-model-name", "tiny", "--enable-lora", "--max-loras", "4"]
    args += ["--max-lora-rank", str(TINY_RANK), "--dtype", "float32", "--max-model-len", "256"]
    args += ["--enforce-eager", "--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(2**27)]
    args += ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
    args += ["--lora-modules", *[f"{n}={adapters[n]}" for n in ADAPTERS]]
    if ours:
        args += ["--middleware", MIDDLEWARE]
    return args


def workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], tuple, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))]
        rows.append((ids, ((rng.choice(ADAPTERS), 1.0),), rng.choice(LENGTHS)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=common.results_dir("cpu") / "parallel.json")
    args = parser.parse_args(argv)
    from openai import OpenAI
    from transformers import AutoConfig

    root = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    model_dir, adapters = build_tiny_llama(root)
    rows = workload(args.requests, AutoConfig.from_pretrained(model_dir).vocab_size, seed=0)
    reference = TinyReference(model_dir, adapters)
    env = {"VLLM_CPU_OMP_THREADS_BIND": bind_threads(2)}
    servers, result = (
        {},
        {
            "environment": common.environment("cpu", ("vllm-cpu", "transformers", "openai")),
            "settings": {
                "model": "parallel_util.build_tiny_llama (hidden 256, 4 layers, 4/2 heads, fp32)",
                "tensor_parallel_size": 2,
                "max_loras": 4,
                "clients": args.clients,
                "requests": args.requests,
                "lengths": LENGTHS,
                "workload": "one adapter per request, 4 adapters",
                "omp_threads_bind": env["VLLM_CPU_OMP_THREADS_BIND"],
            },
            "rounds": [],
        },
    )
    try:
        servers["vllm"] = Server(
            server_args(model_dir, adapters, False), root / "vllm.log", env={**env, "VLLM_PLUGINS": "none"}
        )
        servers["ours"] = Server(server_args(model_dir, adapters, True), root / "ours.log", env=env)
        clients = {
            name: OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=600)
            for name, s in servers.items()
        }
        for name in servers:  # warm-up: every adapter loaded once
            run(clients[name], rows[: args.clients], args.clients, model="tiny")
        checked = 0
        for r in range(args.rounds):
            order = ("vllm", "ours") if r % 2 == 0 else ("ours", "vllm")
            row = {}
            for name in order:
                stats = run(clients[name], rows, args.clients, model="tiny")
                checked += check(rows, stats.pop("outputs"), reference, name)
                row[name] = stats
                print(f"round {r} {name:>4} {stats}", flush=True)
            row["ours_vs_vllm_tokens_per_s"] = round(
                row["ours"]["tokens_per_s"] / row["vllm"]["tokens_per_s"], 3
            )
            result["rounds"].append(row)
            common.write_json(args.out, result)
        result["checked_responses"] = checked
        ratios = [rd["ours_vs_vllm_tokens_per_s"] for rd in result["rounds"]]
        result["ours_vs_vllm_per_round"] = ratios
        result["ours_vs_vllm_median"] = round(statistics.median(ratios), 3)
        common.write_json(args.out, result)
        print("ours/vLLM tokens/s per round:", ratios, "median", result["ours_vs_vllm_median"], flush=True)
    finally:
        for s in servers.values():
            s.stop(keep_log=True)
        print(f"server logs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
