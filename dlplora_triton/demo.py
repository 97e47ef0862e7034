"""``dlplora demo``: the kernel on a mixed batch, checked against the float64 reference, and timed."""

from __future__ import annotations

import time

import torch

from .ops import fused_lora, fused_lora_planned
from .plan import build_plan
from .reference import fused_lora_reference


def _median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (try cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return dev


def demo_fused_lora(device: str, seed: int) -> bool:
    """One adapted layer, four sequences with their own adapter mixes; prints a table, returns pass."""
    g = torch.Generator().manual_seed(seed)
    K, N, L, R = 512, 512, 6, 16
    seq_lens = [37, 1, 90, 0]
    ranks = torch.tensor([16, 8, 4, 16, 12, 1])
    selection = [[(0, 0.7), (3, 0.3)], [(1, 1.0)], [(0, 0.5), (2, 0.25), (5, 0.25)], [(4, 1.0)]]
    P = max(len(row) for row in selection)
    ids = torch.full((len(selection), P), -1, dtype=torch.int64)
    weights = torch.zeros(len(selection), P)
    for s, row in enumerate(selection):
        for p, (adapter, weight) in enumerate(row):
            ids[s, p], weights[s, p] = adapter, weight
    offsets = torch.tensor([0] + torch.tensor(seq_lens).cumsum(0).tolist())
    x = torch.randn(sum(seq_lens), K, generator=g)
    a = torch.randn(L, R, K, generator=g) / K**0.5
    b = torch.randn(L, N, R, generator=g) / R**0.5
    scales = torch.full((L,), 2.0)
    base_w = torch.randn(N, K, generator=g) / K**0.5

    ref = fused_lora_reference(x.double(), a.double(), b.double(), offsets, ids, weights.double(), ranks, scales.double())
    dev = _device(device)
    args = [t.to(dev) for t in (x, a, b, offsets, ids, weights)]
    kwargs = {"ranks": ranks.to(dev), "scales": scales.to(dev)}
    y = fused_lora(*args, **kwargs)
    err = float((y.double().cpu() - ref).norm() / ref.norm())

    print(f"fused_lora on {dev} ({'Triton' if dev.type == 'cuda' else 'PyTorch'} backend): "
          f"T={x.shape[0]} tokens, K={K}, N={N}, {L} adapters, ranks {ranks.tolist()}")
    print(f"  {'sequence':<9}{'tokens':>7}  adapters (weight)")
    for s, row in enumerate(selection):
        mix = ", ".join(f"{adapter} ({weight:g})" for adapter, weight in row) or "base"
        print(f"  {s:<9}{seq_lens[s]:>7}  {mix}")
    print(f"  relative error vs the float64 reference: {err:.2e}")
    x_d, w_d = args[0], base_w.to(dev)
    t_base = _median_ms(lambda: x_d @ w_d.T)
    plan = build_plan(args[3], args[4], args[5], L)
    t_plan = _median_ms(lambda: build_plan(args[3], args[4], args[5], L))
    t_lora = _median_ms(lambda: fused_lora_planned(x_d, args[1], args[2], plan, **kwargs, out=x_d @ w_d.T))
    print(f"  base linear {t_base:.3f} ms; base + fused multi-LoRA with a prebuilt plan {t_lora:.3f} ms "
          f"({t_lora / t_base:.2f}x); the plan, built once per forward for all layers: {t_plan:.3f} ms")
    return err < 1e-4


def run_demo(device: str = "cpu", seed: int = 0) -> int:
    """Run every part of the demo; returns 0 when all outputs matched their oracles."""
    torch.manual_seed(seed)
    ok = demo_fused_lora(device, seed)
    print("demo:", "all outputs match their references" if ok else "MISMATCH against the reference")
    return 0 if ok else 1
