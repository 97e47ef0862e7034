"""Kernel microbenchmarks: one adapted layer, ours against the baselines users would pick.

    dlplora bench --device cuda            # the GPU suite (bench/run_gpu.sh runs it)
    dlplora bench --device cpu --quick     # the CPU suite (small shapes, fp32)

Providers, all measured in the same process on the same inputs:
  base        the base GEMM x @ W^T alone
  ours        the fused multi-LoRA delta (plan prebuilt, as in a model forward), added into a buffer
  ours_layer  base GEMM + fused delta added into its output (the whole adapted layer)
  one_row     ours with only each row's first slot (P = 1: what vLLM / Punica / S-LoRA serve)
  loop        per-adapter loop, PEFT-style: gather the rows of each distinct adapter, two matmuls, scatter
  dense       X-LoRA-style: every adapter on every token, unused ones masked by a zero coefficient

The roofline floor of the delta: the bytes that must move (x, the output read and written, each
distinct adapter's A and B once) over the measured copy bandwidth, and the FLOPs over the measured
matmul rate; the larger of the two. Results go to bench/results/<device>/kernels.{json,csv,png}.
"""

from __future__ import annotations

import csv
import datetime
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .backends.torch_path import TorchPathCache, fused_lora_torch
from .ops import fused_lora_planned, workspace_bytes
from .plan import build_plan

# Results land in the checkout's bench/results/ when run from one, else in ./bench-results/.
_CHECKOUT_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
RESULTS = _CHECKOUT_RESULTS if _CHECKOUT_RESULTS.parent.is_dir() else Path.cwd() / "bench-results"
POPULARITY = ("identical", "uniform", "zipf", "distinct")


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


def routing(
    seqs: int, L: int, P: int, popularity: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """adapter_ids [S, P] (distinct within a row) and weights [S, P] (positive, rows sum to 1)."""
    if popularity == "identical":
        first = torch.zeros(seqs, dtype=torch.int64)
    elif popularity == "uniform":
        first = torch.randint(0, L, (seqs,), generator=gen)
    elif popularity == "zipf":  # P(rank k) ~ k^-1.5
        probs = torch.arange(1, L + 1, dtype=torch.float64) ** -1.5
        first = torch.multinomial(probs / probs.sum(), seqs, replacement=True, generator=gen)
    elif popularity == "distinct":
        first = (torch.arange(seqs) * P) % L
    else:
        raise ValueError(f"popularity must be one of {POPULARITY}, got {popularity!r}")
    ids = (first[:, None] + torch.arange(P)[None, :]) % L  # the next adapters fill the other slots
    weights = torch.rand(seqs, P, generator=gen) + 0.1
    return ids, weights / weights.sum(1, keepdim=True)


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


def time_ms(fn, device: str, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds after warm-up (compilation included in the warm-up)."""
    if device.startswith("cuda"):
        import triton.testing

        fn()
        torch.cuda.synchronize()
        q = triton.testing.do_bench(
            fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.5, 0.2, 0.8]
        )
        return tuple(q)
    fn()
    times = []
    deadline = time.perf_counter() + (0.2 if quick else 1.0)
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


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


def suite(device: str, quick: bool) -> list[Shape]:
    """Sweeps around a default point (one axis at a time), so the GPU suite fits one 10-minute call."""
    if not device.startswith("cuda"):
        shapes = []
        for seqs, tps in ((1, 1), (8, 1), (64, 1), (8, 64)):
            for pop in ("uniform", "distinct"):
                shapes.append(
                    Shape(f"S{seqs}x{tps}", seqs, tps, 512, 512, 16, 8, 3 if tps == 1 else 1, pop, "fp32")
                )
        return shapes[:4] if quick else shapes
    shapes = []
    kn = [(4096, 4096), (4096, 14336)]
    dtypes = ["bf16"] if quick else ["bf16", "fp16"]
    for dtype in dtypes:
        for K, N in kn:
            tag = f"{K}x{N}"
            batches = [(1, 1), (8, 1), (32, 1), (64, 1), (128, 1), (256, 1), (8, 512), (1, 4096)]
            for seqs, tps in batches if not quick else batches[3:4] + batches[6:7]:
                shapes.append(
                    Shape(f"batch:{tag}", seqs, tps, K, N, 16, 32, 3 if tps == 1 else 1, "zipf", dtype)
                )
            if quick:
                continue
            for ranks in (8, 64, "mixed"):
                shapes.append(Shape(f"rank:{tag}", 64, 1, K, N, ranks, 32, 3, "zipf", dtype))
            for L in (8, 128):
                shapes.append(Shape(f"adapters:{tag}", 64, 1, K, N, 16, L, 3, "zipf", dtype))
            for P in (1, 2, 4):
                shapes.append(Shape(f"slots:{tag}", 64, 1, K, N, 16, 32, P, "zipf", dtype))
            for pop in POPULARITY:
                for seqs in (8, 64, 256):
                    shapes.append(Shape(f"popularity:{tag}", seqs, 1, K, N, 16, 32, 3, pop, dtype))
    return shapes


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent
        ).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_name()
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "threads": torch.get_num_threads(),
    }


def run(device: str, quick: bool, out_dir: Path | None = None, providers=PROVIDERS) -> dict:
    """Run the suite; write JSON, CSV and (with matplotlib) a PNG; return the result dict."""
    env = environment(device)
    ceilings = measure_ceilings(device)
    copies = 4 if device.startswith("cuda") else 1
    rows = []
    for shape in suite(device, quick):
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
            med, p20, p80 = time_ms(getattr(case, provider)(), device, quick)
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
        print(_format_row(row), flush=True)
        del case
    result = {"environment": env, "ceilings": ceilings, "rows": rows}
    out_dir = out_dir or RESULTS / results_dir_name(device, env["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / "kernels.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r})
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out_dir / "kernels.png", env["device"])
    return result


def results_dir_name(device: str, name: str) -> str:
    """bench/results/ subfolder: "cpu" for any CPU, else the GPU's name (e.g. nvidia-h100-80gb-hbm3)."""
    if not device.startswith("cuda"):
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


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
