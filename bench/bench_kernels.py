"""Kernel microbenchmarks: one adapted layer, ours against the baselines users would pick.

    python bench/bench_kernels.py --device cuda --stage headline   # design decode + prefill 8 x 512
    python bench/bench_kernels.py --device cuda --stage rest       # the rest of the GPU sweep
    python bench/bench_kernels.py --device cpu --quick             # the CPU suite (small shapes, fp32)

Providers, all measured in the same process on the same inputs:
  base        the base GEMM x @ W^T alone
  ours        the fused multi-LoRA delta (plan prebuilt, as in a model forward), added into a buffer
  ours_layer  base GEMM + fused delta added into its output (the whole adapted layer)
  one_row     ours with only each row's first slot (P = 1: what vLLM / Punica / S-LoRA serve)
  loop        per-adapter loop, PEFT-style: gather the rows of each distinct adapter, two matmuls, scatter
  dense       X-LoRA-style: every adapter on every token, unused ones masked by a zero coefficient

The roofline floor of the delta: the bytes that must move (x, the output read and written, each
distinct adapter's A and B once) over the measured copy bandwidth, and the FLOPs over the measured
matmul rate; the larger of the two. Results: bench/results/<device>/kernels[-<stage>].{json,csv,png};
the JSON is rewritten after every row, so a run cut off keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import common
import torch

from dlplora_triton.backends.torch_path import TorchPathCache, fused_lora_torch
from dlplora_triton.compile_check import POPULARITY, routing
from dlplora_triton.ops import fused_lora_planned, workspace_bytes
from dlplora_triton.plan import build_plan

STAGES = ("all", "headline", "rest")


@dataclass
class Shape:
    """One benchmark point. ``ranks`` is an int (all adapters) or the string "mixed" (8..128)."""

    name: str
    seqs: int
    tokens_per_seq: int
    K: int
    N: int
    ranks: int | str
    L: int
    P: int
    popularity: str
    dtype: str


def _dtype(name: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


class LayerCase:
    """Inputs of one adapted layer, rotated through ``copies`` sets so timings do not measure L2."""

    def __init__(self, shape: Shape, device: str, copies: int = 1, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        dtype = _dtype(shape.dtype)
        self.shape = shape
        S, T = shape.seqs, shape.seqs * shape.tokens_per_seq
        R = 128 if shape.ranks == "mixed" else int(shape.ranks)
        ranks = (
            torch.randint(8, 129, (shape.L,), generator=gen)
            if shape.ranks == "mixed"
            else torch.full((shape.L,), R)
        )
        ids, weights = routing(S, shape.L, shape.P, shape.popularity, gen)
        offsets = torch.arange(S + 1) * shape.tokens_per_seq
        dev = torch.device(device)

        def rand(*size, scale=1.0):
            return (torch.randn(*size, generator=gen) * scale).to(dev, dtype)

        self.sets = [
            {
                "x": rand(T, shape.K),
                "w": rand(shape.N, shape.K, scale=shape.K**-0.5),
                "a": rand(shape.L, R, shape.K, scale=shape.K**-0.5),
                "b": rand(shape.L, shape.N, R, scale=R**-0.5),
            }
            for _ in range(copies)
        ]
        self.ranks = ranks.to(dev, torch.int32)
        self.ranks_host = ranks.tolist()
        self.scales = torch.full((shape.L,), 2.0, device=dev)
        self.offsets, self.ids, self.weights = offsets.to(dev), ids.to(dev), weights.to(dev)
        self.plan = build_plan(self.offsets, self.ids, self.weights, shape.L, num_tokens=T)
        self.plan_p1 = build_plan(
            self.offsets,
            self.ids[:, :1].contiguous(),
            torch.ones_like(self.weights[:, :1]),
            shape.L,
            num_tokens=T,
        )
        self.out = torch.zeros(T, shape.N, device=dev, dtype=dtype)
        # X-LoRA-style coefficient of each adapter for each token (0 for the ones a token does not use).
        coeff = torch.zeros(S, shape.L, device=dev, dtype=torch.float32)
        coeff.scatter_add_(1, self.ids, self.weights.float())
        rank_mask = (torch.arange(R, device=dev)[None, :] < self.ranks[:, None]).float()  # [L, R]
        self.dense_coeff = (
            (coeff.repeat_interleave(shape.tokens_per_seq, 0)[:, :, None] * rank_mask * 2.0)
            .reshape(T, -1)
            .to(dtype)
        )
        self._turn = 0

    def _next(self) -> dict:
        self._turn = (self._turn + 1) % len(self.sets)
        return self.sets[self._turn]

    def floor(self) -> tuple[float, float]:
        """(bytes, flops) the fused delta must move and compute."""
        s = self.shape
        elt = _dtype(s.dtype).itemsize
        T = s.seqs * s.tokens_per_seq
        used = torch.unique(self.ids).tolist()
        weight_elems = sum(self.ranks_host[i] * (s.K + s.N) for i in used)
        rank_per_token = sum(self.ranks_host[i] for i in self.ids.reshape(-1).tolist()) / s.seqs
        bytes_ = elt * (T * s.K + 2 * T * s.N + weight_elems)
        flops = 2.0 * T * rank_per_token * (s.K + s.N)
        return bytes_, flops

    # --- providers: each returns a zero-argument callable -------------------------------------
    def base(self):
        def run():
            d = self._next()
            torch.matmul(d["x"], d["w"].t())

        return run

    def ours(self):
        def run():
            d = self._next()
            fused_lora_planned(
                d["x"], d["a"], d["b"], self.plan, ranks=self.ranks, scales=self.scales, out=self.out
            )

        return run

    def ours_layer(self):
        def run():
            d = self._next()
            y = torch.matmul(d["x"], d["w"].t())
            fused_lora_planned(d["x"], d["a"], d["b"], self.plan, ranks=self.ranks, scales=self.scales, out=y)

        return run

    def one_row(self):
        def run():
            d = self._next()
            fused_lora_planned(
                d["x"], d["a"], d["b"], self.plan_p1, ranks=self.ranks, scales=self.scales, out=self.out
            )

        return run

    def loop(self):
        cache = TorchPathCache(self.plan)
        cache.host_groups()  # grouping on the host once, as PEFT's adapter_names bookkeeping

        def run():
            d = self._next()
            fused_lora_torch(
                d["x"],
                d["a"],
                d["b"],
                self.plan,
                self.out,
                self.ranks_host,
                [2.0] * self.shape.L,
                method="grouped",
                cache=cache,
            )

        return run

    def dense(self):
        for d in self.sets:  # stored the way this method wants them: A as [L*R, K], B as [L*R, N]
            d["a_cat"] = d["a"].reshape(-1, self.shape.K)
            d["b_cat"] = d["b"].transpose(1, 2).reshape(-1, self.shape.N).contiguous()

        def run():
            d = self._next()
            v = torch.matmul(d["x"], d["a_cat"].t()) * self.dense_coeff
            self.out.addmm_(v, d["b_cat"])

        return run


PROVIDERS = ("base", "ours", "ours_layer", "one_row", "loop", "dense")


def measure_ceilings(device: str) -> dict:
    """Copy bandwidth (bytes read + written per s) and matmul rate of the device, measured once."""
    if not device.startswith("cuda"):
        return {}
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])[0]
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ a, quantiles=[0.5])[0]
    return {"copy_GBps": 2 * src.numel() / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def _allocation_growth(fn, calls: int = 100) -> int:
    """Bytes still allocated after ``calls`` more calls than after one: 0 when nothing leaks or grows."""
    fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before


def suite(device: str, quick: bool, stage: str = "all") -> list[Shape]:
    """Sweeps around a default point (one axis at a time). On CUDA, ``stage`` "headline" is the design
    decode shape (S = 64, K = N = 4096, r = 16, L = 32, P = 3, zipf) and prefill 8 x 512 in bf16;
    "rest" is everything else; each fits one device command."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not device.startswith("cuda"):
        shapes = []
        for seqs, tps in ((1, 1), (8, 1), (64, 1), (8, 64)):
            for pop in ("uniform", "distinct"):
                shapes.append(
                    Shape(f"S{seqs}x{tps}", seqs, tps, 512, 512, 16, 8, 3 if tps == 1 else 1, pop, "fp32")
                )
        return shapes[:4] if quick else shapes
    headline = [
        Shape("batch:4096x4096", 64, 1, 4096, 4096, 16, 32, 3, "zipf", "bf16"),
        Shape("batch:4096x4096", 8, 512, 4096, 4096, 16, 32, 1, "zipf", "bf16"),
    ]
    if stage == "headline" or quick:
        return headline
    shapes = []
    for dtype in ("bf16", "fp16"):
        for K, N in ((4096, 4096), (4096, 14336)):
            tag = f"{K}x{N}"
            for seqs, tps in ((1, 1), (8, 1), (32, 1), (64, 1), (128, 1), (256, 1), (8, 512), (1, 4096)):
                shapes.append(
                    Shape(f"batch:{tag}", seqs, tps, K, N, 16, 32, 3 if tps == 1 else 1, "zipf", dtype)
                )
            for ranks in (8, 64, "mixed"):
                shapes.append(Shape(f"rank:{tag}", 64, 1, K, N, ranks, 32, 3, "zipf", dtype))
            for L in (8, 128):
                shapes.append(Shape(f"adapters:{tag}", 64, 1, K, N, 16, L, 3, "zipf", dtype))
            for P in (1, 2, 4):
                shapes.append(Shape(f"slots:{tag}", 64, 1, K, N, 16, 32, P, "zipf", dtype))
            for pop in POPULARITY:
                for seqs in (8, 64, 256):
                    shapes.append(Shape(f"popularity:{tag}", seqs, 1, K, N, 16, 32, 3, pop, dtype))
    if stage == "rest":
        return [s for s in shapes if s not in headline]
    return shapes


def run(
    device: str, quick: bool, out_dir: Path | None = None, providers=PROVIDERS, stage: str = "all"
) -> dict:
    """Run the suite; write JSON (after every row), CSV and (with matplotlib) a PNG; return the result."""
    env = common.environment(device)
    ceilings = measure_ceilings(device)
    copies = 4 if device.startswith("cuda") else 1
    rows = []
    result = {"environment": env, "ceilings": ceilings, "stage": stage, "quick": quick, "rows": rows}
    out_dir = out_dir or common.results_dir(device)
    stem = "kernels" if stage == "all" else f"kernels-{stage}"
    for shape in suite(device, quick, stage):
        case = LayerCase(shape, device, copies=copies)
        bytes_, flops = case.floor()
        row = asdict(shape) | {
            "T": shape.seqs * shape.tokens_per_seq,
            "distinct_adapters": len(torch.unique(case.ids)),
            "floor_bytes": bytes_,
            "floor_flops": flops,
            "plan_bytes": case.plan.nbytes,
            "workspace_bytes": workspace_bytes(case.plan, case.sets[0]["a"]),
        }
        for provider in providers:
            if (
                provider == "dense"
                and shape.L * (128 if shape.ranks == "mixed" else int(shape.ranks)) * row["T"] > 2**28
            ):
                continue  # the dense baseline's intermediate would not fit
            med, p20, p80 = common.median_ms(getattr(case, provider)(), device, quick)
            row[f"{provider}_ms"], row[f"{provider}_p20_ms"], row[f"{provider}_p80_ms"] = med, p20, p80
        if ceilings:
            floor_ms = max(bytes_ / ceilings["copy_GBps"] / 1e6, flops / ceilings["bf16_matmul_TFLOPs"] / 1e9)
            row["floor_ms"] = floor_ms
            row["ours_pct_of_floor"] = 100 * floor_ms / row["ours_ms"]
        row["ours_GBps"] = bytes_ / row["ours_ms"] / 1e6
        row["ours_over_base"] = row["ours_ms"] / row["base_ms"]
        row["ours_over_one_row"] = row["ours_ms"] / row["one_row_ms"]
        row["loop_over_ours"] = row["loop_ms"] / row["ours_ms"]
        row["layer_over_base"] = row["ours_layer_ms"] / row["base_ms"]
        if device.startswith("cuda"):
            row["allocated_growth_bytes"] = _allocation_growth(case.ours())
        rows.append(row)
        common.write_json(out_dir / f"{stem}.json", result)
        print(_format_row(row), flush=True)
        del case
    common.write_json(out_dir / f"{stem}.json", result)
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r})
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out_dir / f"{stem}.png", env["device"])
    return result


def _format_row(row: dict) -> str:
    floor = f" floor {row['ours_pct_of_floor']:5.1f}%" if "ours_pct_of_floor" in row else ""
    return (
        f"{row['name']:<22} {row['dtype']} S={row['seqs']:<4} T={row['T']:<5} r={row['ranks']!s:<5} L={row['L']:<3} "
        f"P={row['P']} {row['popularity']:<9} base {row['base_ms']:.4f}  ours {row['ours_ms']:.4f}  "
        f"ours/one_row {row['ours_over_one_row']:.2f}  loop/ours {row['loop_over_ours']:.2f}  "
        f"layer/base {row['layer_over_base']:.3f}  {row['ours_GBps']:.0f} GB/s{floor}"
    )


def _plot(rows: list[dict], path: Path, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["name"].startswith(("batch", "popularity", "S")):
            groups.setdefault((row["name"], row["popularity"], row["dtype"]), []).append(row)
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, ((name, pop, dtype), series) in zip(axes[0], sorted(groups.items())):
        series.sort(key=lambda r: r["T"])
        for provider in PROVIDERS:
            points = [(r["T"], r[f"{provider}_ms"]) for r in series if f"{provider}_ms" in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        if any("floor_ms" in r for r in series):
            ax.plot([r["T"] for r in series], [r["floor_ms"] for r in series], "k--", label="floor (delta)")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms", title=f"{name} {pop} {dtype}")
        ax.legend(fontsize=7)
    fig.suptitle(f"one adapted layer on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few points per sweep")
    parser.add_argument(
        "--stage", default="all", choices=STAGES, help="GPU: headline shapes, the rest, or all"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results/<device>/)"
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    run(args.device, args.quick, args.out, stage=args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
