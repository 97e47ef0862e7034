"""``dlplora demo`` on SmolLM2-135M-Instruct with the six task adapters it ships (data/adapters/smollm2/).

A router trained on the text set's training split picks each prompt's adapter mix (top-p), or the
base model for a prompt no adapter fits (two general questions are in the batch); the batch
is generated in one ``generate`` call on the fused path, and checked against PEFT serving the same
mixes (``add_weighted_adapter(..., "cat")`` per mix, ``adapter_names`` per row): greedy tokens equal,
prompt logits to fp32 precision. Prompts are the openings of held-out sentences, two of them joining
two tasks. docs/real-model.md describes the model, the tasks and the experiment.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch

from .smollm2 import load_smollm2
from .tasks import TASKS, adapter_paths, load_texts, task_split

__all__ = ["ROUTER_OPTIONS", "ROUTING", "OFF_TOPIC", "train_task_router", "demo_prompts", "run_real_demo"]

# A small router (about 1M parameters): seconds to train on 2 cores, held-out accuracy ~97%.
ROUTER_OPTIONS = {"num_buckets": 2**14, "hidden": (64,), "epochs": 8}
ROUTING = {"p": 0.8, "top_k": 3}  # adapters until 80% of the probability is covered, at most 3
ROUTER_TEXTS_PER_TASK = 600
# Prompts for no adapter: the router abstains and the base model serves them, in the same batch.
OFF_TOPIC = ["hello, how are you?", "What is the capital of France?"]


def train_task_router(seed: int = 0, **options):
    """A :class:`Router` serving ``TASKS`` trained on the training split (at most 600 texts per task).

    The text set's other tasks (es, license, shell: first 600 texts each) and the package's general
    prompts are its background: prompts like them are served by the base model (docs/routing.md)."""
    from ..routing import Router

    all_texts, all_tasks = load_texts()
    train, _ = task_split(all_texts, all_tasks)
    for text, task in zip(all_texts, all_tasks):  # tasks without an adapter: background classes
        if task not in TASKS and len(train.setdefault(task, [])) < ROUTER_TEXTS_PER_TASK:
            train[task].append(text)
    texts = [t for name in train for t in train[name][:ROUTER_TEXTS_PER_TASK]]
    labels = [name for name in train for _ in train[name][:ROUTER_TEXTS_PER_TASK]]
    return Router.train(texts, labels, adapters=list(TASKS), seed=seed, **{**ROUTER_OPTIONS, **options})


def _opening(text: str, fraction: float = 0.5) -> str:
    """The first ``fraction`` of a sentence: whole words where it has spaces, characters otherwise."""
    words = text.split()
    if len(words) >= 4:
        return " ".join(words[: max(3, round(len(words) * fraction))])
    return text[: max(6, round(len(text) * fraction))]


def demo_prompts() -> tuple[list[str], list[str]]:
    """``(prompts, labels)``: the opening of one held-out sentence per task, and two two-task prompts."""
    _, held = task_split(*load_texts())
    prompts = [_opening(held[name][0]) for name in TASKS]
    labels = list(TASKS)
    for first, second in (("de", "code"), ("ru", "fr")):
        prompts.append(held[first][1] + " " + _opening(held[second][1]))
        labels.append(f"{first}+{second}")
    return prompts, labels


def _short(text: str, width: int) -> str:
    text = " ".join(text.replace("\ufffd", "").split())  # a character cut at the last token
    return text if len(text) <= width else text[: width - 1] + "…"


def run_real_demo(device: str = "cpu", seed: int = 0, max_new_tokens: int = 16) -> bool:
    """Route, generate and check against PEFT; prints a table and the times. Returns whether all matched."""
    from ..generation import generate_routed
    from ..patch import attach
    from .peft_baseline import peft_mixed_batch

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(seed)
    paths = adapter_paths()  # before the model: a wheel install has no adapters (FileNotFoundError)
    start = time.perf_counter()
    model, tokenizer = load_smollm2(verbose=True)
    model = model.to(device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    router = train_task_router(seed)
    router_s = time.perf_counter() - start
    print(
        f"SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32, "
        f"{device}) loaded in {load_s:.1f} s; {len(paths)} task adapters ({', '.join(paths)}); router "
        f"trained in {router_s:.1f} s, held-out accuracy {router.report['heldout_accuracy']:.1%}"
    )

    prompts, labels = demo_prompts()
    prompts, labels = prompts + OFF_TOPIC, labels + ["none"] * len(OFF_TOPIC)  # for the base model
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    selection = router.route(prompts, **ROUTING)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)

    with torch.no_grad():
        model.generate(**batch, **{**gen, "max_new_tokens": 1})  # warm-up: first-call costs left out
        start = time.perf_counter()
        model.generate(**batch, **gen)
    base_s = time.perf_counter() - start
    start = time.perf_counter()
    peft_model, row_names = peft_mixed_batch(copy.deepcopy(model), paths, selection)
    merge_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        peft_out = peft_model.generate(**batch, adapter_names=row_names, **gen)
    peft_s = time.perf_counter() - start
    with torch.no_grad():
        peft_logits = peft_model(**batch, adapter_names=row_names).logits
    del peft_model

    lora = attach(model, paths)
    try:
        results = generate_routed(model, lora, router, tokenizer, prompts, **ROUTING, **gen)
        with lora.selection(selection), torch.no_grad():
            ours_logits = model(**batch).logits
    finally:
        lora.detach()
    ours_s = results[0].route_s + results[0].prefill_s + results[0].decode_s

    new_peft = peft_out[:, batch["input_ids"].shape[1] :].tolist()
    logit_err = float((ours_logits - peft_logits).norm() / peft_logits.norm())
    same = [r.token_ids == t for r, t in zip(results, new_peft)]
    print(f"\n{'task':<8} {'prompt':<40} {'adapters (weight)':<26} {'=PEFT':<6} generated")
    for label, result, ok in zip(labels, results, same):
        mix = ", ".join(f"{name} {weight:.2f}" for name, weight in result.adapters) or "base model"
        print(
            f"{label:<8} {_short(result.prompt, 40):<40} {mix:<26} {'yes' if ok else 'NO':<6} {_short(result.text, 60)!r}"
        )
    print(
        f"\nbatch of {len(prompts)} prompts, {max_new_tokens} new tokens each (greedy, {device}, fp32, one run):"
    )
    print(f"  base model alone            {base_s:7.2f} s")
    print(
        f"  PEFT, adapter_names per row {peft_s:7.2f} s ({peft_s / base_s:.2f}x base), after merging "
        f"{len(set(row_names) - {'__base__'})} mixes in {merge_s:.1f} s"
    )
    print(
        f"  ours, routed and fused      {ours_s:7.2f} s ({ours_s / base_s:.2f}x base, no merging): route "
        f"{results[0].route_s * 1e3:.0f} ms, prefill {results[0].prefill_s:.2f} s, decode {results[0].decode_s:.2f} s"
    )
    print(
        f"  prompt logits vs PEFT: relative error {logit_err:.1e}; greedy tokens equal: {sum(same)}/{len(same)}"
    )
    return logit_err < 1e-4 and all(same)
