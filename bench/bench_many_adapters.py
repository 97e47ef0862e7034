"""Many distinct adapters in one planned call: does the time follow the bytes of the distinct adapters
read, or the (row, slot) pairs?

    python bench/bench_many_adapters.py --device cpu [--quick] [--out FILE]
    python bench/bench_many_adapters.py --device cuda [--quick]    # bench/run_gpu.sh 3

One planned call per measurement (``fused_lora_planned``; the plan and the PyTorch path's host data
built once, as a model forward builds them once for all its layers): the PyTorch path on CPU (fp32),
the Triton kernels on CUDA (bf16). A stack of L = 64 adapters of rank 16, B stored as the layers store
it ([L, R, N], read through a transposed view); row s, slot p uses adapter (s * P + p) % D, so the
batch uses exactly D distinct adapters, each by about rows * P / D (row, slot) pairs. Points, for
decode (1 token per row) and prefill (16 tokens per row), K = N = 576 (SmolLM2-135M's hidden) and
K = 576, N = 1536 (its MLP; on CUDA also 4096 x 4096):

  distinct  32 rows, P = 1 or 3 slots per row, D = 1, 2, 4, ..., 64 distinct adapters (D <= rows * P)
  pairs     D = 8 and D = 64, rows 8 ... 128, P = 1 or 3: the (row, slot) pairs grow at fixed D

On CPU each of the PyTorch path's three methods runs forced as well, interleaved with the planned call
round by round (``common.interleaved_seconds``: a slow phase of the shared machine hits them alike;
15 rounds, more (up to 100) to last 0.1 s, fewer but at least 5 where they would take over 0.5 s), so
every point shows what each would cost next to the one ``auto`` picked ("planned" adds the public
call's checks and the auto choice to the forced method's time). On CUDA, ``common.median_ms`` (CUDA
events). Per point: median ms, distinct adapter bytes (D * R * (K + N) * element size), rows * P,
tokens, the method picked, the load average and the share of the CPUs other processes took meanwhile
(from /proc/stat; a point where they took over 20% is measured again, up to 3 times in all). Per
(shape, mode, provider): least squares of the time on [1, distinct bytes, pairs, tokens]. Results:
bench/results/<device>/many_adapters.{json,png}, the JSON rewritten after every point.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import common
import torch

from dlplora_triton import build_plan, fused_lora_planned
from dlplora_triton.backends.torch_path import TorchPathCache, fused_lora_torch, pick_method

L, R = 64, 16
ROWS = 32
DISTINCT = (1, 2, 4, 8, 16, 32, 64)
PAIRS_ROWS = (8, 16, 32, 64, 128)
PAIRS_DISTINCT = (8, 64)
MODES = {"decode": 1, "prefill": 16}
METHODS = ("dense", "seq_bmm", "grouped")
# CPU: a point during which other processes used more than this share of the CPUs is measured again,
# up to ATTEMPTS times in all (the last one is kept; others_cpu_share records it).
BUSY_SHARE = 0.2
ATTEMPTS = 3


def points(quick: bool) -> list[dict]:
    """(rows, P, D) of both sweeps, each point once (the distinct sweep's 32-row points are shared)."""
    seen, out = set(), []
    distinct = (1, 8, 64) if quick else DISTINCT
    pairs_rows = (8, 32, 128) if quick else PAIRS_ROWS
    for P in (1, 3):
        for D in distinct:
            if D <= ROWS * P:
                seen.add((ROWS, P, D))
                out.append({"sweep": "distinct", "rows": ROWS, "P": P, "D": D})
    for D in PAIRS_DISTINCT:
        for P in (1, 3):
            for rows in pairs_rows:
                if D <= rows * P and (rows, P, D) not in seen:
                    seen.add((rows, P, D))
                    out.append({"sweep": "pairs", "rows": rows, "P": P, "D": D})
    return out


def shapes(device: str) -> list[tuple[int, int]]:
    base = [(576, 576), (576, 1536)]
    return base + [(4096, 4096)] if device.startswith("cuda") else base


class Case:
    """Inputs of one point: x, the stacks, the plan and its host data (built once)."""

    def __init__(self, rows: int, tokens_per_row: int, P: int, D: int, K: int, N: int, device, dtype):
        gen = torch.Generator().manual_seed(rows * 1000 + P * 100 + D)
        T = rows * tokens_per_row
        ids = (torch.arange(rows)[:, None] * P + torch.arange(P)[None, :]) % D
        weights = torch.rand(rows, P, generator=gen) + 0.1
        weights = weights / weights.sum(1, keepdim=True)
        self.x = torch.randn(T, K, generator=gen).to(device, dtype)
        self.a = (torch.randn(L, R, K, generator=gen) * K**-0.5).to(device, dtype)
        # [L, N, R] read through a transposed view of [L, R, N], as MultiLoRALinear stores B.
        self.b = (torch.randn(L, R, N, generator=gen) * R**-0.5).to(device, dtype).transpose(1, 2)
        self.scales = torch.full((L,), 2.0, device=device)
        offsets = (torch.arange(rows + 1) * tokens_per_row).to(device)
        self.plan = build_plan(offsets, ids.to(device), weights.to(device), L, num_tokens=T)
        self.cache = TorchPathCache(self.plan)
        self.out = torch.zeros(T, N, device=device, dtype=dtype)

    def planned(self):
        cache = None if self.x.is_cuda else self.cache
        return lambda: fused_lora_planned(
            self.x, self.a, self.b, self.plan, scales=self.scales, out=self.out, cache=cache
        )

    def forced(self, method: str):
        return lambda: fused_lora_torch(
            self.x, self.a, self.b, self.plan, self.out, scales=self.scales, method=method, cache=self.cache
        )


def _cpu_marks() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds every process has run, CPU seconds of this process), or None without
    /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, time.process_time()


def _others_share(before) -> float | None:
    """Share of the machine's CPUs that other processes used since ``before`` (``_cpu_marks()``)."""
    after = _cpu_marks()
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / ((after[0] - before[0]) * (os.cpu_count() or 1)))


def measure(case: Case, device: str, rounds: int, point_s: float) -> dict:
    """{provider: (median, p20, p80) ms}: planned alone on CUDA; on CPU with the forced methods,
    interleaved round by round: ``rounds`` rounds, fewer (at least 5) where they would take more than
    ``point_s`` seconds."""
    if device.startswith("cuda"):
        return {"planned": common.median_ms(case.planned(), device, quick=rounds < 10)}
    providers = {"planned": case.planned()} | {m: case.forced(m) for m in METHODS}
    common.interleaved_seconds(providers, repeats=0, warmup=1)
    first = common.interleaved_seconds(providers, repeats=1, warmup=0)
    round_s = sum(s[0] for s in first.values())
    # At least 0.1 s of rounds (100 at most), so /proc/stat's 10 ms ticks can tell whether other
    # processes ran meanwhile; at most point_s (5 rounds at least).
    fit_in = int(point_s / max(round_s, 1e-9))
    rounds = max(5, min(fit_in, max(rounds, min(100, int(0.1 / max(round_s, 1e-9))))))
    samples = common.interleaved_seconds(providers, repeats=rounds, warmup=0)
    result = {}
    for name, seconds in samples.items():
        ms = sorted(s * 1e3 for s in seconds)
        result[name] = (
            statistics.median(ms),
            ms[int(0.2 * len(ms))],
            ms[min(len(ms) - 1, int(0.8 * len(ms)))],
        )
    return result


def fit(rows: list[dict], provider: str) -> dict | None:
    """Least squares of ``provider``'s ms on [1, distinct MB, pairs, tokens] over ``rows``, with R^2
    and, at the largest distinct point (32 rows x 3, D = 64), the ms each term accounts for; None
    without numpy or with fewer than 6 points."""
    try:
        import numpy as np
    except ImportError:
        return None
    rows = [r for r in rows if f"{provider}_ms" in r]
    if len(rows) < 6:
        return None
    X = np.array([[1.0, r["distinct_bytes"] / 1e6, r["row_slot_pairs"], r["tokens"]] for r in rows])
    y = np.array([r[f"{provider}_ms"] for r in rows])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    residual = y - X @ coef
    r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    ref = max((r for r in rows if r["sweep"] == "distinct"), key=lambda r: (r["P"], r["D"]))
    terms = [1.0, ref["distinct_bytes"] / 1e6, ref["row_slot_pairs"], ref["tokens"]]
    return {
        "points": len(rows),
        "intercept_ms": float(coef[0]),
        "ms_per_distinct_MB": float(coef[1]),
        "us_per_row_slot_pair": float(coef[2]) * 1e3,
        "us_per_token": float(coef[3]) * 1e3,
        "r2": r2,
        "at": {k: ref[k] for k in ("rows", "P", "D", "tokens")},
        "ms_at": {
            name: float(c * t)
            for name, c, t in zip(("intercept", "distinct_bytes", "row_slot_pairs", "tokens"), coef, terms)
        },
    }


def ratios(rows: list[dict], provider: str) -> list[dict]:
    """Growth of ``provider``'s time against growth of distinct bytes (32 rows, D from smallest to
    largest) and of pairs (P = 3 against P = 1 at the same rows and D; fixed D, rows from fewest to
    most, where the tokens grow too)."""
    out = []
    key = f"{provider}_ms"
    for P in (1, 3):
        line = sorted((r for r in rows if r["sweep"] == "distinct" and r["P"] == P), key=lambda r: r["D"])
        if len(line) >= 2:
            lo, hi = line[0], line[-1]
            out.append(
                {
                    "what": f"{ROWS} rows x {P}: D {lo['D']} -> {hi['D']}",
                    "bytes_ratio": hi["distinct_bytes"] / lo["distinct_bytes"],
                    "pairs_ratio": 1.0,
                    "time_ratio": hi[key] / lo[key],
                }
            )
    by_point = {(r["rows"], r["P"], r["D"]): r for r in rows}
    for D in DISTINCT:  # the same rows, tokens and distinct bytes, three times the pairs
        one, three = by_point.get((ROWS, 1, D)), by_point.get((ROWS, 3, D))
        if one and three:
            out.append(
                {
                    "what": f"{ROWS} rows, D = {D}: P 1 -> 3",
                    "bytes_ratio": 1.0,
                    "pairs_ratio": 3.0,
                    "time_ratio": three[key] / one[key],
                }
            )
    for D in PAIRS_DISTINCT:
        for P in (1, 3):
            line = sorted((r for r in rows if r["D"] == D and r["P"] == P), key=lambda r: r["rows"])
            if len(line) >= 2:
                lo, hi = line[0], line[-1]
                out.append(
                    {
                        "what": f"D = {D}, P = {P}: rows {lo['rows']} -> {hi['rows']}",
                        "bytes_ratio": 1.0,
                        "pairs_ratio": hi["row_slot_pairs"] / lo["row_slot_pairs"],
                        "time_ratio": hi[key] / lo[key],
                    }
                )
    return out


def run(device: str, quick: bool, out_path: Path) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rounds, point_s = (8, 0.3) if quick else (15, 0.5)
    env = common.environment(device)
    result = {
        "environment": env,
        "note": (
            "CPU: the machine's 2 cores were shared with other work (another helper, engine tests) "
            "during the run: see load_average at start (environment), per point and at the end, "
            "and each point's others_cpu_share. seq_bmm gathers rows x P copies of A and B on every "
            "call; with glibc's default malloc the frees of the calls interleaved with it can hand "
            "those pages back to the OS, and the next call faults them in again: its times at many "
            "pairs (decode P = 3; prefill 128 rows x 3) include that (docs/pytorch-path.md)"
        )
        if not device.startswith("cuda")
        else "",
        "quick": quick,
        "L": L,
        "R": R,
        "dtype": str(dtype).removeprefix("torch."),
        "rows": [],
        "fits": {},
        "ratios": {},
    }
    if not device.startswith("cuda"):  # the first second of a process runs slow here: warm up first
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            torch.randn(256, 256) @ torch.randn(256, 256)
    elt = torch.empty((), dtype=dtype).element_size()
    providers = ("planned",) if device.startswith("cuda") else ("planned", *METHODS)
    for K, N in shapes(device):
        for mode, tpr in MODES.items():
            for point in points(quick):
                rows, P, D = point["rows"], point["P"], point["D"]
                case = Case(rows, tpr, P, D, K, N, device, dtype)
                attempts = 0
                while True:
                    attempts += 1
                    marks = _cpu_marks()
                    times = measure(case, device, rounds, point_s)
                    others = _others_share(marks)
                    busy = not device.startswith("cuda") and others is not None and others > BUSY_SHARE
                    if not busy or attempts == ATTEMPTS:
                        break
                    time.sleep(2.0)  # other processes took the CPUs: measure this point again
                row = point | {
                    "shape": f"{K}x{N}",
                    "K": K,
                    "N": N,
                    "mode": mode,
                    "tokens_per_row": tpr,
                    "tokens": rows * tpr,
                    "row_slot_pairs": rows * P,
                    "distinct_bytes": D * R * (K + N) * elt,
                    "method": "triton"
                    if device.startswith("cuda")
                    else pick_method(case.plan, case.a, case.b, cache=case.cache),
                    "load_1min": round(os.getloadavg()[0], 2),
                    "others_cpu_share": None if others is None else round(others, 2),
                    "attempts": attempts,
                }
                for name, (med, p20, p80) in times.items():
                    row[f"{name}_ms"], row[f"{name}_p20_ms"], row[f"{name}_p80_ms"] = med, p20, p80
                result["rows"].append(row)
                common.write_json(out_path, result)
                print(_format(row), flush=True)
                del case
            group = [r for r in result["rows"] if r["shape"] == f"{K}x{N}" and r["mode"] == mode]
            label = f"{K}x{N} {mode}"
            result["fits"][label] = {p: fit(group, p) for p in providers}
            result["ratios"][label] = {p: ratios(group, p) for p in providers}
            _print_fit(label, result["fits"][label])
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    common.write_json(out_path, result)
    _plot(result, out_path.with_suffix(".png"))
    return result


def _format(row: dict) -> str:
    forced = "  ".join(f"{m} {row[f'{m}_ms']:.3f}" for m in METHODS if f"{m}_ms" in row)
    return (
        f"{row['shape']:<9} {row['mode']:<7} rows {row['rows']:>3} P {row['P']} D {row['D']:>2}  "
        f"{row['distinct_bytes'] / 1e6:6.2f} MB  planned {row['planned_ms']:.3f} ms ({row['method']})  {forced}"
    )


def _print_fit(label: str, fits: dict) -> None:
    for provider, f in fits.items():
        if f is not None:
            print(
                f"  fit {label} {provider:<8} {f['intercept_ms']:.3f} ms + {f['ms_per_distinct_MB']:.3f} ms/MB "
                f"+ {f['us_per_row_slot_pair']:.2f} us/pair + {f['us_per_token']:.3f} us/token  R2 {f['r2']:.3f}"
            )


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return
    rows = result["rows"]
    markers = {"dense": "o", "seq_bmm": "s", "grouped": "^", "triton": "D"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for i, mode in enumerate(MODES):
        ax_d, ax_p = axes[i]
        for shape in dict.fromkeys(r["shape"] for r in rows):
            for P in (1, 3):
                line = sorted(
                    (
                        r
                        for r in rows
                        if (r["mode"], r["shape"], r["P"], r["sweep"]) == (mode, shape, P, "distinct")
                    ),
                    key=lambda r: r["D"],
                )
                if line:
                    (h,) = ax_d.plot(
                        [r["distinct_bytes"] / 1e6 for r in line],
                        [r["planned_ms"] for r in line],
                        label=f"{shape} P={P}",
                    )
                    for r in line:
                        ax_d.scatter(
                            r["distinct_bytes"] / 1e6,
                            r["planned_ms"],
                            marker=markers[r["method"]],
                            color=h.get_color(),
                        )
                for D in PAIRS_DISTINCT:
                    line = sorted(
                        (r for r in rows if (r["mode"], r["shape"], r["P"], r["D"]) == (mode, shape, P, D)),
                        key=lambda r: r["rows"],
                    )
                    if len(line) >= 2:
                        (h,) = ax_p.plot(
                            [r["row_slot_pairs"] for r in line],
                            [r["planned_ms"] for r in line],
                            label=f"{shape} P={P} D={D}",
                        )
                        for r in line:
                            ax_p.scatter(
                                r["row_slot_pairs"],
                                r["planned_ms"],
                                marker=markers[r["method"]],
                                color=h.get_color(),
                            )
        ax_d.set(
            xscale="log",
            yscale="log",
            xlabel="distinct adapter MB read",
            ylabel="ms per call",
            title=f"{mode}: {ROWS} rows, D = 1..64",
        )
        ax_p.set(
            xscale="log",
            yscale="log",
            xlabel="(row, slot) pairs",
            ylabel="ms per call",
            title=f"{mode}: fixed D, rows 8..128",
        )
        ax_d.legend(fontsize=7)
        ax_p.legend(fontsize=6)
    used = sorted({r["method"] for r in rows})
    fig.suptitle(
        f"one planned call, many adapters (rank {R}) on {result['environment']['device']}; "
        f"markers: method picked ({', '.join(f'{markers[m]} {m}' for m in used)})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    parser.add_argument("--quick", action="store_true", help="fewer points and rounds")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/<device>/many_adapters.json)"
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    out = args.out or common.results_dir(args.device) / "many_adapters.json"
    run(args.device, args.quick, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
