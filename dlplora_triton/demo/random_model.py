"""``dlplora demo --random``: the kernel on a mixed batch, checked against the float64 reference, and a tiny
random-weight Llama routed and checked against PEFT; timed unless ``quick`` or the machine is busy (load.py)."""

from __future__ import annotations

import time

import torch

from ..ops import fused_lora, fused_lora_planned
from ..plan import build_plan
from ..reference import fused_lora_reference
from .load import load_caveat, machine_load, too_busy_to_time


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


def demo_fused_lora(device: str, seed: int, timed: bool = True) -> bool:
    """One adapted layer, four sequences with their own adapter mixes; prints a table (and the timings when
    ``timed``), returns pass."""
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

    ref = fused_lora_reference(
        x.double(), a.double(), b.double(), offsets, ids, weights.double(), ranks, scales.double()
    )
    dev = _device(device)
    args = [t.to(dev) for t in (x, a, b, offsets, ids, weights)]
    kwargs = {"ranks": ranks.to(dev), "scales": scales.to(dev)}
    y = fused_lora(*args, **kwargs)
    err = float((y.double().cpu() - ref).norm() / ref.norm())

    print(
        f"fused_lora on {dev} ({'Triton' if dev.type == 'cuda' else 'PyTorch'} backend): "
        f"T={x.shape[0]} tokens, K={K}, N={N}, {L} adapters, ranks {ranks.tolist()}"
    )
    print(f"  {'sequence':<9}{'tokens':>7}  adapters (weight)")
    for s, row in enumerate(selection):
        mix = ", ".join(f"{adapter} ({weight:g})" for adapter, weight in row) or "base"
        print(f"  {s:<9}{seq_lens[s]:>7}  {mix}")
    print(f"  relative error vs the float64 reference: {err:.2e}")
    if not timed:
        return err < 1e-4
    x_d, w_d = args[0], base_w.to(dev)
    t_base = _median_ms(lambda: x_d @ w_d.T)
    plan = build_plan(args[3], args[4], args[5], L)
    t_plan = _median_ms(lambda: build_plan(args[3], args[4], args[5], L))
    t_lora = _median_ms(lambda: fused_lora_planned(x_d, args[1], args[2], plan, **kwargs, out=x_d @ w_d.T))
    print(
        f"  base linear {t_base:.3f} ms; base + fused multi-LoRA with a prebuilt plan {t_lora:.3f} ms "
        f"({t_lora / t_base:.2f}x); the plan, built once per forward for all layers: {t_plan:.3f} ms"
    )
    return err < 1e-4


def _adapter_specs(names: list[str]) -> dict[str, dict]:
    """PEFT LoraConfig arguments per task: ranks, targets and rsLoRA differ, as real adapters do."""
    from .toy_model import ALL_PROJECTIONS

    targets = [
        list(ALL_PROJECTIONS),
        ["q_proj", "v_proj"],
        ["gate_proj", "up_proj", "down_proj"],
        ["q_proj", "k_proj", "o_proj"],
    ]
    ranks = [8, 16, 4, 12]
    return {
        name: {
            "r": ranks[i % 4],
            "lora_alpha": 2 * ranks[i % 4],
            "target_modules": targets[i % 4],
            "use_rslora": i % 3 == 2,
            "lora_dropout": 0.0,
        }
        for i, name in enumerate(names)
    }


def demo_system(seed: int, max_new_tokens: int = 12, quick: bool = False, timed: bool = True) -> bool:
    """Router -> per-prompt adapter mixes -> one batched generate on the fused path, checked against PEFT;
    the paths timed (medians of 3 runs) when ``timed``."""
    import copy
    import tempfile
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, not ours

    from ..generation import generate_routed
    from ..patch import attach
    from ..routing import DEFAULT_P, Router
    from .peft_baseline import peft_mixed_batch
    from .tasks import load_texts
    from .text import fit, one_line
    from .toy_model import build_llama, build_tokenizer, make_peft_adapters

    texts, tasks = load_texts()
    by_task: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        by_task.setdefault(task, []).append(i)
    # Train on most of each task; keep a few sentences per task unseen, for the prompts.
    held = {task: idx[-3:] for task, idx in by_task.items()}
    train_idx = [i for task, idx in by_task.items() for i in idx[:-3][: 100 if quick else 600]]
    small = {"num_buckets": 2**14, "hidden": (64,), "epochs": 10} if quick else {}
    start = time.perf_counter()
    router = Router.train([texts[i] for i in train_idx], [tasks[i] for i in train_idx], seed=seed, **small)
    train_s = time.perf_counter() - start
    print(
        f"\nrouter: trained on {len(train_idx)} sentences of {len(router.names)} tasks in {train_s:.1f} s, "
        f"held-out accuracy {router.report['heldout_accuracy']:.1%}"
    )

    names = list(router.names)
    prompts = [texts[held[task][0]] for task in names][:6]
    # Prompts that join two tasks' sentences: the router splits its probability, top-p keeps a mix.
    for first, second in ((0, 7), (1, 5), (3, 4)):
        prompts.append(texts[held[names[first]][1]] + " " + texts[held[names[second % len(names)]][1]])
    routing = {"p": DEFAULT_P, "top_k": 3}  # adapters until 80% of the probability is covered, at most 3
    tokenizer = build_tokenizer(texts, vocab_size=500 if quick else 2000)
    model = build_llama(
        len(tokenizer), seed=seed, **({"hidden": 64, "intermediate": 128, "layers": 2} if quick else {})
    )
    print(
        f"model: a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama built from a config "
        "with RANDOM weights (nothing is downloaded), so its words are not meant to read well"
    )

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_peft_adapters(model, _adapter_specs(list(router.names)), tmp, seed=seed)
        selection = router.route(prompts, **routing)
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        gen = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}

        base_s = _median_s(lambda: model.generate(**batch, **gen)) if timed else 0.0
        start = time.perf_counter()
        peft_model, row_names = peft_mixed_batch(copy.deepcopy(model), paths, selection)
        merge_s = time.perf_counter() - start
        peft_out = peft_model.generate(**batch, adapter_names=row_names, **gen)
        peft_s = (
            _median_s(lambda: peft_model.generate(**batch, adapter_names=row_names, **gen)) if timed else 0.0
        )
        with torch.no_grad():
            peft_logits = peft_model(**batch, adapter_names=row_names).logits

        lora = attach(model, paths)
        if timed:
            generate_routed(model, lora, router, tokenizer, prompts, **routing, **gen)  # warm-up
        runs = sorted(
            (
                generate_routed(model, lora, router, tokenizer, prompts, **routing, **gen)
                for _ in range(3 if timed else 1)
            ),
            key=lambda r: r[0].route_s + r[0].prefill_s + r[0].decode_s,
        )
        results = runs[len(runs) // 2]  # the median run, whose timings are printed
        ours_s = results[0].route_s + results[0].prefill_s + results[0].decode_s
        with lora.selection(selection), torch.no_grad():
            ours_logits = model(**batch).logits
        lora.detach()

    new_peft = peft_out[:, batch["input_ids"].shape[1] :].tolist()
    logit_err = float((ours_logits - peft_logits).norm() / peft_logits.norm())
    print(f"\n{'prompt':<44} {'adapters (weight)':<34} {'= PEFT':<7} generated (random weights)")
    for result, peft_tokens in zip(results, new_peft):
        mix = ", ".join(f"{name} {weight:.2f}" for name, weight in result.adapters) or "base model"
        text = result.text.replace("\n", " ")[:30]
        same = "yes" if result.token_ids == peft_tokens else "NO"
        # fit() pads by display width: a wide (CJK) character takes two columns
        print(f"{fit(one_line(result.prompt), 42)}   {mix:<34} {same:<7} {text!r}")
    r0 = results[0]
    logits_line = f"  logits vs PEFT: relative error {logit_err:.1e}"
    ok = logit_err < 1e-4 and all(r.token_ids == t for r, t in zip(results, new_peft))
    if not timed:
        print(
            f"\nbatch of {len(prompts)} prompts, {max_new_tokens} new tokens each, CPU fp32:\n{logits_line}"
        )
        return ok
    print(
        f"\nbatch of {len(prompts)} prompts, {max_new_tokens} new tokens each (median of 3 runs, CPU fp32):"
    )
    print(f"  base model alone          {base_s * 1e3:8.1f} ms")
    print(
        f"  PEFT mixed batch          {peft_s * 1e3:8.1f} ms  ({peft_s / base_s:.2f}x base), after merging "
        f"{len(set(row_names) - {'__base__'})} mixes in {merge_s * 1e3:.0f} ms"
    )
    print(
        f"  ours (fused, routed)      {ours_s * 1e3:8.1f} ms  ({ours_s / base_s:.2f}x base, no merging): "
        f"route {r0.route_s * 1e3:.1f} ms, prefill {r0.prefill_s * 1e3:.1f} ms, decode {r0.decode_s * 1e3:.1f} ms"
    )
    print(logits_line)
    return ok


def _median_s(fn, repeats: int = 3) -> float:
    return _median_ms(fn, repeats) / 1e3


def run_demo(device: str = "cpu", seed: int = 0, quick: bool = False) -> int:
    """Run every part of the demo; returns 0 when all outputs matched their oracles.

    ``quick``: a smaller router and model and no timings (what the tests run). Otherwise the timings are
    printed with the load average, or none when the machine is busier than its cores.
    """
    load, cores = machine_load()  # before our own work adds to it
    timed = not quick and not too_busy_to_time(load, cores)
    torch.manual_seed(seed)
    ok = demo_fused_lora(device, seed, timed=timed)
    ok = demo_system(seed, quick=quick, timed=timed) and ok
    if quick:
        print("\ntimings: none in the quick form (`dlplora demo --random` prints them)")
    else:
        print(f"\n{load_caveat(load, cores)}")
    print("\ndemo:", "all outputs match their references" if ok else "MISMATCH against the reference")
    return 0 if ok else 1
