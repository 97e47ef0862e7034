"""What a compiled cubin says about itself (through the ``cuobjdump`` the triton wheel ships), and the
occupancy its resources allow. Used by :mod:`dlplora_triton.compile_check`."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

# Tensor-core SASS opcode families: mma.sync (HMMA), Hopper warpgroup MMA (HGMMA), integer / fp8 / fp64.
_TENSOR_CORE = re.compile(r"^(HMMA|HGMMA|IMMA|IGMMA|QGMMA|DMMA|UTC\w*MMA)\b")
# Per-SM limits: registers, shared memory usable by programs, threads, resident programs.
_SM_LIMITS = {
    "sm_80": {"registers": 65536, "shared": 167936, "threads": 2048, "programs": 32},
    "sm_90": {"registers": 65536, "shared": 233472, "threads": 2048, "programs": 32},
}
_SHARED_RESERVED = 1024  # the driver reserves 1 KB of shared memory per program (sm_80 and later)


def cuobjdump() -> str:
    """Path of cuobjdump: the triton wheel's copy, else one on PATH."""
    import triton

    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if shipped.exists():
        return str(shipped)
    found = shutil.which("cuobjdump")
    if not found:
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel ({shipped}) or on PATH")
    return found


def cubin_resources(cubin: Path) -> dict:
    """registers, local_bytes (per thread: spills and local arrays), static_shared_bytes and
    tensor_core_instructions (SASS opcode -> count) of the one kernel in ``cubin``."""
    tool = cuobjdump()
    usage = subprocess.run(
        [tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    if "REG" not in fields:
        raise ValueError(f"cuobjdump -res-usage printed no REG field for {cubin}: {usage[:200]!r}")
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ops = Counter()
    for line in sass.splitlines():
        # "        /*0fa0*/                   HMMA.16816.F32.BF16 R16, R16, R8, R12 ;   /* 0x... */"
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", line)
        if m and _TENSOR_CORE.match(m.group(1)):
            ops[m.group(1)] += 1
    return {
        "registers": int(fields["REG"]),
        "local_bytes": int(fields.get("LOCAL", 0)),
        "stack_bytes": int(fields.get("STACK", 0)),
        "static_shared_bytes": int(fields.get("SHARED", 0)),
        "tensor_core_instructions": dict(sorted(ops.items())),
    }


def occupancy(arch: str, registers: int, shared_bytes: int, num_warps: int) -> dict:
    """Programs one SM can hold and what limits it (registers are allocated per warp in units of 256)."""
    lim = _SM_LIMITS[arch]
    regs_per_warp = -(-max(1, registers) * 32 // 256) * 256
    by = {
        "registers": (lim["registers"] // regs_per_warp) // num_warps,
        "shared": lim["shared"] // (shared_bytes + _SHARED_RESERVED),
        "threads": lim["threads"] // (32 * num_warps),
        "programs": lim["programs"],
    }
    limit = min(by, key=by.get)
    return {"programs_per_sm": by[limit], "limited_by": limit}
