"""End-to-end generation: time to first token and decode tokens/s, ours against what users run today.

    python bench/bench_generation.py                 # CPU: 4-layer Llama (hidden 512), fp32
    python bench/bench_generation.py --device cuda   # GPU: ~1B Llama-architecture model, bf16

Providers (same model, same prompts, greedy, KV cache on):
  base           the base model alone
  peft_one       PEFT, one adapter per row (`adapter_names`, unmerged): the one-LoRA-per-request case
  ours_one       ours, one adapter per row
  peft_mix       PEFT serving per-row mixes: each distinct mix merged first (`add_weighted_adapter`,
                 "cat"; the merge time is reported apart), then a mixed batch
  ours_mix       ours, each row its own routed mix of up to 3 adapters (top-p of random router
                 probabilities), no merging
Results: bench/results/<device>/generation.json. Weights are random: only the times mean anything.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

import dlplora_triton as dlp
from dlplora_triton.demo.peft_baseline import peft_mixed_batch
from dlplora_triton.demo.toy_model import ALL_PROJECTIONS, build_llama, make_peft_adapters
from dlplora_triton.generation import _FirstTokenClock


def model_for(device: str):
    if device == "cpu":
        return build_llama(1000, hidden=512, intermediate=1376, layers=4, heads=8), torch.float32
    # ~1B parameters, Llama-3.2-1B-like widths with fewer layers; random weights, bf16.
    return build_llama(32000, hidden=2048, intermediate=8192, layers=12, heads=32), torch.bfloat16


def timed_generate(generate, device: str) -> tuple[float, float]:
    """(time to first token, decode time) in seconds of one ``generate(logits_processor=...)`` call."""
    from transformers import LogitsProcessorList

    clock = _FirstTokenClock()
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(LogitsProcessorList([clock]))
    if device != "cpu":
        torch.cuda.synchronize()
    end = time.perf_counter()
    return clock.first_call - start, end - clock.first_call


def median_of(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (compilation, caches)
    runs = sorted((fn() for _ in range(repeats)), key=sum)
    return runs[len(runs) // 2]


def run(device: str, quick: bool, batches: list[int] | None = None, path: Path | None = None) -> dict:
    """Time every provider at each batch size; the JSON is rewritten after each batch."""
    torch.manual_seed(0)
    model, dtype = model_for(device)
    L, rank = 8, 16
    names = [f"task{i}" for i in range(L)]
    specs = {n: {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(ALL_PROJECTIONS)} for n in names}
    if batches is None:
        batches = [1, 8] if device == "cpu" else ([8] if quick else [1, 8, 32])
    prompt_len, new_tokens = (32, 16) if device == "cpu" else (128, 64)
    repeats = 3 if quick else 5
    rows = []
    result = {
        "environment": common.environment(device),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype),
        "rows": rows,
    }
    path = path or common.results_dir(device) / "generation.json"
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_peft_adapters(model, specs, tmp)
        model = model.to(device, dtype)
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            input_ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=gen).to(
                device
            )
            kwargs = {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "max_new_tokens": new_tokens,
                "min_new_tokens": new_tokens,
                "do_sample": False,
                "pad_token_id": 0,
            }
            one = [[(names[i % L], 1.0)] for i in range(batch)]
            probs = torch.softmax(torch.randn(batch, L, generator=gen) * 2, dim=1)
            ids, weights = dlp.top_p_select(probs, p=0.8, top_k=3)
            mix = [
                [(names[i], w) for i, w in zip(r_ids, r_w) if i >= 0]
                for r_ids, r_w in zip(ids.tolist(), weights.tolist())
            ]
            row = {
                "batch": batch,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "adapters": L,
                "rank": rank,
                "mean_mix_size": sum(map(len, mix)) / batch,
            }

            def measure(name, generate):
                ttft, decode = median_of(lambda: timed_generate(generate, device), repeats)
                row[f"{name}_ttft_ms"] = ttft * 1e3
                row[f"{name}_decode_tok_s"] = batch * (new_tokens - 1) / decode
                row[f"{name}_total_ms"] = (ttft + decode) * 1e3

            measure("base", lambda lp: model.generate(**kwargs, logits_processor=lp))
            peft_model, one_names = peft_mixed_batch(copy.deepcopy(model), paths, one)
            measure(
                "peft_one",
                lambda lp: peft_model.generate(**kwargs, adapter_names=one_names, logits_processor=lp),
            )
            peft_model = None  # free it before the next model is built
            start = time.perf_counter()
            peft_model, mix_names = peft_mixed_batch(copy.deepcopy(model), paths, mix)
            row["peft_merge_ms"] = (time.perf_counter() - start) * 1e3  # includes loading the 8 adapters
            measure(
                "peft_mix",
                lambda lp: peft_model.generate(**kwargs, adapter_names=mix_names, logits_processor=lp),
            )
            peft_model = None  # free it before the next model is built
            lora = dlp.attach(model, paths)
            with lora.selection(one):
                measure("ours_one", lambda lp: model.generate(**kwargs, logits_processor=lp))
            with lora.selection(mix):
                measure("ours_mix", lambda lp: model.generate(**kwargs, logits_processor=lp))
            lora.detach()
            for name in ("peft_one", "ours_one", "peft_mix", "ours_mix"):
                row[f"{name}_over_base"] = row[f"{name}_total_ms"] / row["base_total_ms"]
            row["ours_mix_over_ours_one"] = row["ours_mix_total_ms"] / row["ours_one_total_ms"]
            rows.append(row)
            common.write_json(path, result)
            print(
                f"batch {batch:>3}: total ms  base {row['base_total_ms']:.1f}  peft_one {row['peft_one_total_ms']:.1f}  "
                f"ours_one {row['ours_one_total_ms']:.1f}  peft_mix {row['peft_mix_total_ms']:.1f} "
                f"(+{row['peft_merge_ms']:.0f} merge)  ours_mix {row['ours_mix_total_ms']:.1f}  |  ours_mix/base "
                f"{row['ours_mix_over_base']:.2f}  ours_mix/ours_one {row['ours_mix_over_ours_one']:.2f}",
                flush=True,
            )
    common.write_json(path, result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default by device)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/<device>/generation.json)"
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    run(args.device, args.quick, batches, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
