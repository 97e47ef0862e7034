"""What ``dlplora compile-check`` checks (the command: ``dlplora_triton.commands.compile_check``): every
kernel variant the block-shape functions choose, compiled for a GPU target with no GPU, and what the
cubins say about them.

For each shape of a documented sweep (:func:`sweep`) it builds the real plan of a zipf-popular routing
on the CPU, asks ``kernels.configs`` for the block shapes and the launchers for their arguments (as
meta tensors), specialises them the way Triton's JIT does, and compiles each distinct variant for
each architecture. ``cuobjdump`` (shipped in the triton wheel) gives registers, local memory
(spills) and the tensor-core instructions of the SASS. What it checks and why: docs/kernels.md.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._cubin import cubin_resources, occupancy
from ._moved import moved_names
from .plan import build_plan

__all__ = ["SweepShape", "sweep", "routing", "run_check", "main_table", "ARCHS", "SM_COUNT"]

ARCHS = {"sm_80": 80, "sm_90": 90}
SM_COUNT = {"sm_80": 108, "sm_90": 132}  # A100, H100 / H200
MIN_DESIGN_PROGRAMS = 264  # 2 per SM of a 132-SM GPU, for each kernel at the design decode shape
MAX_DECODE_VARIANTS = 4  # per kernel, dtype and layer shape over the decode sweep
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
POPULARITY = ("identical", "uniform", "zipf", "distinct")


@dataclass(frozen=True)
class SweepShape:
    """One point: S sequences of ``tokens_per_seq`` tokens through a layer K -> N with L adapters."""

    group: str  # decode | prefill | layer | rank | adapters
    seqs: int
    tokens_per_seq: int
    K: int
    N: int
    rank: int | str  # an int for every adapter, or "mixed" (1..128)
    L: int
    P: int
    dtype: str
    layout: str  # "layers": B stored [L, R, N] viewed as [L, N, R] (what MultiLoRALinear holds); "contiguous"

    @property
    def name(self) -> str:
        return (
            f"{self.group}:S{self.seqs}x{self.tokens_per_seq} K{self.K} N{self.N} r{self.rank} L{self.L} "
            f"P{self.P} {self.dtype} {self.layout}"
        )

    @property
    def design_decode(self) -> bool:
        return (self.seqs, self.tokens_per_seq, self.K, self.N, self.rank, self.L, self.P) == DESIGN_DECODE

    @property
    def layer_key(self) -> str:
        return f"K{self.K} N{self.N} r{self.rank} L{self.L} {self.layout}"


DESIGN_DECODE = (64, 1, 4096, 4096, 16, 32, 3)  # S, tokens per sequence, K, N, r, L, P


def sweep(quick: bool = False) -> list[SweepShape]:
    """The documented sweep (docs/kernels.md). ``quick``: the design decode shape in every dtype, a
    decode S x P grid in bf16 and prefill 8 x 512 in bf16, the layers' B layout only."""
    shapes: list[SweepShape] = []

    def add(group, seqs, tps, K=4096, N=4096, rank=16, L=32, P=3, dtype="bf16", layout="layers"):
        shape = SweepShape(group, seqs, tps, K, N, rank, L, P, dtype, layout)
        if shape not in shapes:
            shapes.append(shape)

    if quick:
        for dtype in DTYPES:
            add("decode", 64, 1, dtype=dtype)
        for seqs in (1, 16, 64, 256):
            for P in (1, 4):
                add("decode", seqs, 1, P=P)
        add("prefill", 8, 512, P=1)
        return shapes
    for dtype in DTYPES:
        for layout in ("layers", "contiguous"):
            for seqs in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                for P in (1, 2, 3, 4):
                    add("decode", seqs, 1, P=P, dtype=dtype, layout=layout)
            for seqs, tps in ((8, 512), (1, 4096)):
                for P in (1, 2):
                    add("prefill", seqs, tps, P=P, dtype=dtype, layout=layout)
            for K, N in ((4096, 14336), (14336, 4096), (2049, 1000)):
                add("layer", 64, 1, K, N, dtype=dtype, layout=layout)
                add("layer", 8, 512, K, N, P=1, dtype=dtype, layout=layout)
            for rank in (8, 64, 128, "mixed"):
                add("rank", 64, 1, rank=rank, dtype=dtype, layout=layout)
                add("rank", 8, 512, rank=rank, P=1, dtype=dtype, layout=layout)
            for L in (8, 128):
                add("adapters", 64, 1, L=L, dtype=dtype, layout=layout)
    return shapes


def routing(
    seqs: int, L: int, P: int, popularity: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """adapter_ids [S, P] (distinct within a row when P <= L) and weights [S, P] (positive, rows sum to 1).

    The first slot follows ``popularity`` (zipf: P(rank k) ~ k^-1.5); the next adapters fill the others.
    """
    if popularity == "identical":
        first = torch.zeros(seqs, dtype=torch.int64)
    elif popularity == "uniform":
        first = torch.randint(0, L, (seqs,), generator=gen)
    elif popularity == "zipf":
        probs = torch.arange(1, L + 1, dtype=torch.float64) ** -1.5
        first = torch.multinomial(probs / probs.sum(), seqs, replacement=True, generator=gen)
    elif popularity == "distinct":
        first = (torch.arange(seqs) * P) % L
    else:
        raise ValueError(f"popularity must be one of {POPULARITY}, got {popularity!r}")
    ids = (first[:, None] + torch.arange(P)[None, :]) % L
    weights = torch.rand(seqs, P, generator=gen) + 0.1
    return ids, weights / weights.sum(1, keepdim=True)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _launches(shape: SweepShape, seed: int = 0) -> dict:
    """kernel name -> (grid, args, meta, busy programs, bytes) for one shape, from its real CPU plan."""
    from dlplora_triton.kernels import expand_config, shrink_config
    from dlplora_triton.kernels.lora_expand import lora_expand_args
    from dlplora_triton.kernels.lora_shrink import lora_shrink_args

    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    S, T, P, L, K, N = shape.seqs, shape.seqs * shape.tokens_per_seq, shape.P, shape.L, shape.K, shape.N
    R = 128 if shape.rank == "mixed" else int(shape.rank)
    ranks = torch.randint(1, 129, (L,), generator=gen) if shape.rank == "mixed" else torch.full((L,), R)
    ids, weights = routing(S, L, P, "zipf", gen)
    plan = build_plan(torch.arange(S + 1) * shape.tokens_per_seq, ids, weights, L, num_tokens=T)
    x = torch.empty(T, K, dtype=dtype, device="meta")
    a = torch.empty(L, R, K, dtype=dtype, device="meta")
    if shape.layout == "layers":
        b = torch.empty(L, R, N, dtype=dtype, device="meta").transpose(1, 2)
    else:
        b = torch.empty(L, N, R, dtype=dtype, device="meta")
    out = torch.empty(T, N, dtype=dtype, device="meta")
    ranks32, scales = torch.empty(L, dtype=torch.int32, device="meta"), torch.empty(L, device="meta")
    s_cfg = shrink_config(plan.shrink_tile_start.numel(), K, R, dtype)
    e_cfg = expand_config(plan.expand_tile_count.numel(), N, R, dtype)
    v = torch.empty(s_cfg["SPLIT_K"], T * P, R, device="meta")
    shrink = lora_shrink_args(
        x, a, v, _meta(plan.sorted_rows), _meta(plan.shrink_tile_adapter), _meta(plan.shrink_tile_start),
        _meta(plan.shrink_tile_end), _meta(plan.token_weight).view(-1), ranks32, scales, P, s_cfg,
    )  # fmt: skip
    expand = lora_expand_args(
        v, b, out, _meta(plan.token_adapter), _meta(plan.expand_tile_count),
        _meta(plan.expand_tile_adapters), ranks32, plan.expand_block_m, e_cfg,
    )  # fmt: skip

    # Work and bytes from the concrete plan: what each program loads, counted without any cache.
    elt, split = dtype.itemsize, s_cfg["SPLIT_K"]
    rank_of = ranks.tolist()
    starts, ends = plan.shrink_tile_start.tolist(), plan.shrink_tile_end.tolist()
    tile_adapter = plan.shrink_tile_adapter.tolist()
    used = [i for i, c in enumerate(plan.row_counts.tolist()) if c > 0]
    row_rank = sum(rank_of[i] * c for i, c in enumerate(plan.row_counts.tolist()))  # sum over rows of r_i
    busy_shrink = a_loaded = 0
    for i, lo, hi in zip(tile_adapter, starts, ends):
        if hi > lo:
            chunks = -(-rank_of[i] // s_cfg["BLOCK_R"])
            busy_shrink += chunks * split
            a_loaded += -(-(hi - lo) // s_cfg["BLOCK_M"]) * rank_of[i] * K * elt
    counts = plan.expand_tile_count.tolist()
    adapters = plan.expand_tile_adapters.tolist()
    n_cols = -(-N // e_cfg["BLOCK_N"])
    b_loaded = sum(rank_of[i] for c, row in zip(counts, adapters) for i in row[:c]) * N * elt
    floor_a = sum(rank_of[i] for i in used) * K * elt
    return {
        "_lora_shrink_kernel": (
            shrink,
            busy_shrink,
            {"weights_loaded": a_loaded, "weights_floor": floor_a, "v_written": split * row_rank * 4},
        ),
        "_lora_expand_kernel": (
            expand,
            sum(1 for c in counts if c > 0) * n_cols,
            {
                "weights_loaded": b_loaded,
                "weights_floor": sum(rank_of[i] for i in used) * N * elt,
                "v_read": n_cols * split * row_rank * 4,
                "out_read_written": 2 * T * N * elt,
            },
        ),
    }


def _specialise(kernel, arch: str, args: list, meta: dict):
    """(target, backend, options, signature, constexprs, attrs) exactly as Triton's JIT would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", ARCHS[arch], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return target, options, signature, constexprs, attrs


def _variant_record(kernel, arch: str, dtype: str, args: list, meta: dict) -> tuple[str, dict, tuple]:
    target, options, signature, constexprs, attrs = _specialise(kernel, arch, args, meta)
    names = list(signature)
    const_named = {names[path[0]]: value for path, value in constexprs.items()}
    aligned = sorted(names[p[0]] for p, v in attrs.items() if any(a[0] == "tt.divisibility" for a in v))
    record = {
        "kernel": kernel.__name__,
        "arch": arch,
        "dtype": dtype,
        "signature": signature,
        "constexprs": {
            k: (v if isinstance(v, (bool, int, float)) else str(v)) for k, v in const_named.items()
        },
        "divisible_by_16": aligned,
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
    }
    vid = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]
    return vid, record, (kernel, target, signature, constexprs, attrs, options)


def _compile(record: dict, job: tuple, workdir: Path) -> dict:
    import triton
    from triton.compiler import ASTSource

    kernel, target, signature, constexprs, attrs, options = job
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=target,
            options=options.__dict__,
        )
    except Exception as err:  # a compile error is a finding, reported with the variant
        return record | {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1:]}"}
    cubin = workdir / f"{record['kernel']}-{record['arch']}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    res = cubin_resources(cubin)
    shared = int(compiled.metadata.shared) + res["static_shared_bytes"]
    return record | {
        "compile_s": round(time.perf_counter() - start, 2),
        "registers": res["registers"],
        "spill_bytes": res["local_bytes"],
        "shared_bytes": shared,
        "tensor_core_instructions": res["tensor_core_instructions"],
        "occupancy": occupancy(record["arch"], res["registers"], shared, record["num_warps"]),
    }


def run_check(archs: list[str], quick: bool, progress=print) -> dict:
    """Compile the sweep for ``archs``; returns the report (see the module docstring and docs/kernels.md)."""
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        raise ValueError(f"--arch takes a comma-separated list of {sorted(ARCHS)}, got {archs!r}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("compile-check compiles for a GPU target: unset TRITON_INTERPRET (it is '1')")
    import triton

    from dlplora_triton.kernels.lora_expand import _lora_expand_kernel
    from dlplora_triton.kernels.lora_shrink import _lora_shrink_kernel

    kernels = {k.__name__: k for k in (_lora_shrink_kernel, _lora_expand_kernel)}
    for name, k in kernels.items():
        if not hasattr(k, "params"):
            raise ValueError(
                f"{name} is not a compilable @triton.jit function (TRITON_INTERPRET set at import?)"
            )
    variants: dict[str, dict] = {}
    jobs: dict[str, tuple] = {}
    rows = []
    shapes = sweep(quick)
    for shape in shapes:
        for kname, ((grid, args, meta), busy, bytes_) in _launches(shape).items():
            programs = grid[0] * grid[1] * (grid[2] if len(grid) > 2 else 1)
            for arch in archs:
                vid, record, job = _variant_record(kernels[kname], arch, shape.dtype, args, meta)
                variants.setdefault(vid, record)
                jobs.setdefault(vid, job)
                rows.append(
                    {
                        "shape": shape.name,
                        **asdict(shape),
                        "design_decode": shape.design_decode,
                        "kernel": kname,
                        "arch": arch,
                        "grid": list(grid),
                        "grid_programs": programs,
                        "busy_programs": busy,
                        "programs_per_sm": round(programs / SM_COUNT[arch], 2),
                        "variant": vid,
                        "bytes": bytes_,
                    }
                )
    progress(f"{len(shapes)} shapes, {len(variants)} distinct variants for {','.join(archs)}")
    with tempfile.TemporaryDirectory() as tmp:
        for n, (vid, record) in enumerate(variants.items(), 1):
            variants[vid] = _compile(record, jobs[vid], Path(tmp)) | {"id": vid}
            v = variants[vid]
            progress(
                f"[{n}/{len(variants)}] {v['kernel']} {v['arch']} {_const_summary(v)}: "
                + (v["error"] if "error" in v else f"{v['registers']} regs, {v['spill_bytes']} B local, "
                   f"{sum(v['tensor_core_instructions'].values())} MMA, {v['compile_s']} s")
            )  # fmt: skip
    counts = _decode_variant_counts(rows, variants)
    report = {
        "environment": _environment(triton.__version__),
        "archs": archs,
        "quick": quick,
        "checks": {
            "min_design_decode_programs": MIN_DESIGN_PROGRAMS,
            "max_decode_variants": MAX_DECODE_VARIANTS,
        },
        "variants": list(variants.values()),
        "shapes": rows,
        "decode_variant_counts": counts,
    }
    report["failures"] = _failures(report)
    return report


def _const_summary(v: dict) -> str:
    c = v["constexprs"]
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_K", "BLOCK_P", "SPLIT_K")
    return v["dtype"] + " " + " ".join(f"{k.removeprefix('BLOCK_')}={c[k]}" for k in keys if k in c)


def _decode_variant_counts(rows: list[dict], variants: dict) -> list[dict]:
    groups: dict[tuple, set] = {}
    for r in rows:
        if r["tokens_per_seq"] == 1:
            groups.setdefault((r["kernel"], r["arch"], r["dtype"], f"K{r['K']} N{r['N']} r{r['rank']} L{r['L']} {r['layout']}"), set()).add(r["variant"])  # fmt: skip
    return [
        {"kernel": k, "arch": a, "dtype": d, "layer": layer, "variants": len(ids), "variant_ids": sorted(ids)}
        for (k, a, d, layer), ids in sorted(groups.items())
    ]


def _failures(report: dict) -> list[str]:
    out = []
    for v in report["variants"]:
        what = f"{v['kernel']} {v['arch']} {_const_summary(v)} (variant {v['id']})"
        if "error" in v:
            out.append(f"{what}: compile error {v['error']}")
            continue
        if v["spill_bytes"]:
            out.append(f"{what}: {v['spill_bytes']} bytes of local memory per thread (spills)")
        if v["dtype"] in ("fp16", "bf16") and not v["tensor_core_instructions"]:
            out.append(f"{what}: an fp16/bf16 variant without tensor-core instructions")
    for c in report["decode_variant_counts"]:
        if c["variants"] > MAX_DECODE_VARIANTS:
            out.append(
                f"{c['kernel']} {c['arch']} {c['dtype']} {c['layer']}: {c['variants']} decode variants "
                f"(more than {MAX_DECODE_VARIANTS})"
            )
    for r in report["shapes"]:
        if r["design_decode"] and r["grid_programs"] < MIN_DESIGN_PROGRAMS:
            out.append(
                f"{r['kernel']} at {r['shape']}: {r['grid_programs']} programs (< {MIN_DESIGN_PROGRAMS})"
            )
    return out


def source_sha() -> str:
    """Hash of what decides the variants: the kernels' files and the plan's block sizes."""
    import inspect

    from dlplora_triton import kernels

    from .plan import plan_block_sizes

    digest = hashlib.sha1()
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    digest.update(inspect.getsource(plan_block_sizes).encode())
    return digest.hexdigest()[:12]


def _environment(triton_version: str) -> dict:
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here
        )
        commit = commit.stdout.strip()
    except OSError:
        commit = ""
    return {
        "triton": triton_version,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "source_sha": source_sha(),
    }


def main_table(report: dict) -> str:
    """A markdown summary: per kernel, arch and dtype the variants and their worst resources, then
    the design decode shape's grids."""
    by: dict[tuple, list[dict]] = {}
    for v in report["variants"]:
        by.setdefault((v["kernel"], v["arch"], v["dtype"]), []).append(v)
    decode_max = Counter()
    for c in report["decode_variant_counts"]:
        key = (c["kernel"], c["arch"], c["dtype"])
        decode_max[key] = max(decode_max[key], c["variants"])
    lines = [
        "| kernel | arch | dtype | variants | decode variants (max per layer) | registers | spill bytes | "
        "shared KB | tensor-core opcodes (in how many variants) | programs/SM (occupancy) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, arch, dtype), vs in sorted(by.items()):
        ok = [v for v in vs if "error" not in v]
        mma = Counter()
        for v in ok:
            mma.update({re.sub(r"\..*", "", op): n for op, n in v["tensor_core_instructions"].items()})
        no_tc = sum(1 for v in ok if not v["tensor_core_instructions"])
        lines.append(
            f"| {kernel} | {arch} | {dtype} | {len(vs)}{f' ({len(vs) - len(ok)} failed)' if len(ok) < len(vs) else ''} "
            f"| {decode_max[(kernel, arch, dtype)]} | {min(v['registers'] for v in ok)}-{max(v['registers'] for v in ok)} "
            f"| {max(v['spill_bytes'] for v in ok)} | {max(v['shared_bytes'] for v in ok) / 1024:.0f} "
            f"| {', '.join([f'{op} in {n}' for op, n in _variants_with(ok).items()] + ([f'none in {no_tc}'] if no_tc else []))} "
            f"| {min(v['occupancy']['programs_per_sm'] for v in ok)}-{max(v['occupancy']['programs_per_sm'] for v in ok)} |"
        )  # fmt: skip
    lines += ["", "Design decode shape (S = 64, K = N = 4096, r = 16, L = 32, P = 3, zipf):", ""]
    lines += [
        "| kernel | arch | dtype | layout | grid | programs | busy | weight bytes loaded / floor | v bytes |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in report["shapes"]:
        if r["design_decode"]:
            b = r["bytes"]
            v_bytes = b.get("v_written", b.get("v_read"))
            lines.append(
                f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['layout']} | {r['grid']} | {r['grid_programs']} "
                f"| {r['busy_programs']} | {b['weights_loaded'] / 1e6:.2f} MB / {b['weights_floor'] / 1e6:.2f} MB "
                f"| {v_bytes / 1e6:.2f} MB |"
            )  # fmt: skip
    return "\n".join(lines)


def _variants_with(variants: list[dict]) -> Counter:
    seen = Counter()
    for v in variants:
        seen.update({re.sub(r"\..*", "", op) for op in v["tensor_core_instructions"]})
    return seen


# Moved in 0.2: the command is dlplora_triton.commands.compile_check.
__getattr__ = moved_names(
    __name__,
    {
        "main": "dlplora_triton.commands.compile_check:check",
    },
)
