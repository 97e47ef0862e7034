"""Which PyTorch-path method to use on CPU: grouped (two matmuls per distinct adapter), seq_bmm (gather
each sequence's adapters, two batched matmuls) or dense (every used rank unit on every token). Prints
a table; the crossovers set DENSE_MAX_TOKEN_RANKS, SEQ_BMM_MIN_TOKENS and SEQ_BMM_MAX_PAIRS.

    python bench/bench_torch_path.py [--quick] [--threads 2] [--out /tmp/torch_path.json]

Median ms per call (bench/common.py's host-clock timer: at least 5 calls, up to 1 s, or 0.2 s with --quick).
"""

import argparse
from pathlib import Path

import common
import torch

import dlplora_triton as dlp
from dlplora_triton.backends.torch_path import TorchPathCache, fused_lora_torch


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.2 s per timing instead of 1 s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows and the stamp as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def median_ms(fn) -> float:
        return common.median_ms(fn, "cpu", quick=args.quick)[0]

    result = {"environment": common.environment("cpu"), "rows": []}
    gen = torch.Generator().manual_seed(0)
    K, L, R = 512, 8, 16
    print(
        f"{'seqs':>4} {'tokens':>6} {'P':>2} {'N':>5} {'base':>8} {'grouped':>8} {'seq_bmm':>8} {'dense':>8}  fastest"
    )
    for seqs, tokens, P in [
        (8, 1, 1),
        (8, 1, 3),
        (32, 1, 3),
        (8, 4, 3),
        (8, 8, 1),
        (8, 8, 3),
        (8, 16, 3),
        (8, 64, 1),
        (8, 64, 3),
    ]:
        for N in (512, 1376):
            x = torch.randn(seqs * tokens, K, generator=gen)
            w = torch.randn(N, K, generator=gen)
            a, b = torch.randn(L, R, K, generator=gen), torch.randn(L, N, R, generator=gen)
            ids = torch.stack([torch.randperm(L, generator=gen)[:P] for _ in range(seqs)])
            weights = torch.rand(seqs, P, generator=gen)
            plan = dlp.build_plan(torch.arange(seqs + 1) * tokens, ids, weights, L)
            out = torch.zeros(seqs * tokens, N)
            cache = TorchPathCache(plan)  # host data read once, as the layers of a forward pass share it
            base = median_ms(lambda: x @ w.T)
            grouped = median_ms(lambda: fused_lora_torch(x, a, b, plan, out, method="grouped", cache=cache))
            seq_bmm = median_ms(lambda: fused_lora_torch(x, a, b, plan, out, method="seq_bmm", cache=cache))
            dense = median_ms(lambda: fused_lora_torch(x, a, b, plan, out, method="dense", cache=cache))
            times = {"grouped": grouped, "seq_bmm": seq_bmm, "dense": dense}
            fastest = min(times, key=times.get)
            result["rows"].append(
                {"seqs": seqs, "tokens": tokens, "P": P, "N": N, "base_ms": base}
                | {f"{name}_ms": t for name, t in times.items()}
                | {"fastest": fastest}
            )
            if args.out is not None:
                common.write_json(args.out, result)
            print(
                f"{seqs:>4} {tokens:>6} {P:>2} {N:>5} {base:8.3f} {grouped:8.3f} {seq_bmm:8.3f} {dense:8.3f}  "
                f"{fastest}"
            )
    return result["rows"]


if __name__ == "__main__":
    main()
