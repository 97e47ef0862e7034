"""Where the LoRA time of a CPU forward goes: aten ops against the host work around them, per layer call.

    python bench/bench_host_cost.py [--rounds 5] [--repeats 10] [--threads 2] [--out bench/results/cpu/host_cost.json]

The model and adapters of ``bench_model_cpu.py`` (4-layer Llama, hidden 512, 8 PEFT adapters of rank 16
on the 7 projections: 28 adapted layer calls per forward), four batches: prefill 8 rows x 64 tokens and
decode (one token per row, KV cache of 16), each with one adapter per row and with a mix of 3 per row.

For each batch:

- ``base_ms`` / ``ours_ms``: one forward, median of ``--rounds`` interleaved rounds (the ratio is the
  median of the per-round ratios);
- ``lora_us_per_layer_call``: ``(ours - base) / 28``;
- from ``torch.profiler`` (one extra pass each, not timed above): the aten ops the LoRA path adds per
  layer call (count and self CPU time, ours minus base, by op name) and ``host_us_per_layer_call``,
  the LoRA time the ops do not account for: Python in the layers, ``ops`` and the PyTorch path, and
  PyTorch's dispatch around each op.

The plan is reused between passes (one selection per batch, as in generation); ``bench_model_cpu.py``
times a new selection per forward.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import common
import torch
from bench_model_cpu import RESULTS, build_base, environment, save_adapters
from torch.profiler import ProfilerActivity, profile

import dlplora_triton as dlp

LAYER_CALLS = 28  # 4 decoder layers x 7 projections


def aten_self_us(fn, passes: int = 3) -> dict[str, tuple[float, float]]:
    """aten op name -> (calls, self CPU microseconds) per pass of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            fn()
    return {
        e.key: (e.count / passes, e.self_cpu_time_total / passes)
        for e in prof.key_averages()
        if e.key.startswith("aten::")
    }


def batches(names: list[str], rows: int) -> dict:
    gen = torch.Generator().manual_seed(2)
    mixes = []
    for _ in range(rows):
        chosen = torch.randperm(len(names), generator=gen)[:3].tolist()
        weights = (torch.rand(3, generator=gen) + 0.1).tolist()
        total = sum(weights)
        mixes.append([(names[i], w / total) for i, w in zip(chosen, weights)])
    return {
        "one adapter per row": [[(names[s % len(names)], 1.0)] for s in range(rows)],
        "mix of 3 per row": mixes,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved passes per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "host_cost.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, prompt = 8, 64
    base = build_base()
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(base, Path(tmp), 8, 16)
        model = copy.deepcopy(base)
        lora = dlp.attach(model, paths)
    ids = torch.randint(0, 1000, (rows, prompt), generator=torch.Generator().manual_seed(1))
    results = {"environment": environment(), "threads": args.threads, "cases": []}
    with torch.inference_mode():
        cache = base(ids[:, :16], use_cache=True).past_key_values
        step = torch.randint(0, 1000, (rows, 1), generator=torch.Generator().manual_seed(3))
        for phase in ("prefill", "decode"):
            for label, selection in batches(list(paths), rows).items():
                lora.select(selection)
                if phase == "prefill":
                    run_base, run_ours = (lambda: base(ids)), (lambda: model(ids))
                else:  # a copy of the cache per pass: every pass decodes the same 17th token
                    run_base = lambda: base(step, past_key_values=copy.deepcopy(cache))  # noqa: E731
                    run_ours = lambda: model(step, past_key_values=copy.deepcopy(cache))  # noqa: E731
                per_round, base_s, ours_s = [], [], []
                for _ in range(args.rounds):
                    s = common.interleaved_seconds({"base": run_base, "ours": run_ours}, args.repeats)
                    per_round.append(statistics.median(o / b for o, b in zip(s["ours"], s["base"])))
                    base_s += s["base"]
                    ours_s += s["ours"]
                b_ms, o_ms = statistics.median(base_s) * 1e3, statistics.median(ours_s) * 1e3
                ops_base, ops_ours = aten_self_us(run_base), aten_self_us(run_ours)
                extra = {}
                for name, (calls, us) in ops_ours.items():
                    calls0, us0 = ops_base.get(name, (0, 0.0))
                    if calls - calls0 > 0 or us - us0 > 1:
                        extra[name] = {
                            "calls_per_layer_call": round((calls - calls0) / LAYER_CALLS, 2),
                            "self_us_per_layer_call": round((us - us0) / LAYER_CALLS, 1),
                        }
                extra = dict(sorted(extra.items(), key=lambda kv: -kv[1]["self_us_per_layer_call"]))
                lora_us = (o_ms - b_ms) * 1e3 / LAYER_CALLS
                op_us = sum(v["self_us_per_layer_call"] for v in extra.values())
                case = {
                    "phase": phase,
                    "batch": label,
                    "tokens": rows * (prompt if phase == "prefill" else 1),
                    "base_ms": round(b_ms, 3),
                    "ours_ms": round(o_ms, 3),
                    "ours_over_base": round(statistics.median(per_round), 3),
                    "ours_over_base_per_round": [round(r, 3) for r in per_round],
                    "lora_us_per_layer_call": round(lora_us, 1),
                    "aten_us_per_layer_call": round(op_us, 1),
                    "host_us_per_layer_call": round(lora_us - op_us, 1),
                    "aten_ops_per_layer_call": round(
                        sum(v["calls_per_layer_call"] for v in extra.values()), 1
                    ),
                    "extra_aten_ops": dict(list(extra.items())[:8]),
                }
                results["cases"].append(case)
                print(
                    f"{phase:7s} {label:20s} base {b_ms:7.2f} ms, ours {o_ms:7.2f} ms, x{case['ours_over_base']:.3f}; "
                    f"per layer call: LoRA {lora_us:6.1f} us = aten {op_us:6.1f} + host {lora_us - op_us:6.1f} "
                    f"({case['aten_ops_per_layer_call']} ops)",
                    flush=True,
                )
    common.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
