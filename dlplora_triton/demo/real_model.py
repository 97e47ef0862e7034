"""``dlplora demo`` on SmolLM2-135M-Instruct with the six task adapters it ships (data/adapters/smollm2/).

A router trained on the text set's training split picks each prompt's adapter mix (top-p), or the
base model for a prompt no adapter fits (two general questions are in the batch); the batch
is generated in one ``generate`` call on the fused path, and checked against PEFT serving the same
mixes (``add_weighted_adapter(..., "cat")`` per mix, ``adapter_names`` per row): greedy tokens equal,
prompt logits to fp32 precision. Each prompt's base-model answer is printed beside the routed one. Prompts are the openings of held-out sentences, two of them joining
two tasks. The model reads each prompt through its chat template (it is an Instruct model: without the
template it ends its answer to a question at once); the router reads the prompt as written. Timings are
printed with the machine's load average, and none on a busy machine (demo/load.py). docs/real-model.md
describes the model, the tasks and the experiment.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch

from ..defaults import DEFAULT_P
from .load import load_caveat, machine_load, too_busy_to_time
from .smollm2 import load_smollm2, smollm2_folder
from .tasks import TASKS, adapter_paths, load_texts, task_split
from .text import fit, one_line

__all__ = ["ROUTER_OPTIONS", "ROUTING", "OFF_TOPIC", "train_task_router", "demo_prompts", "run_real_demo"]

# A small router (about 1M parameters): seconds to train on 2 cores, held-out accuracy ~97%.
ROUTER_OPTIONS = {"num_buckets": 2**14, "hidden": (64,), "epochs": 8}
ROUTING = {"p": DEFAULT_P, "top_k": 3}  # adapters until 80% of the probability is covered, at most 3
ROUTER_TEXTS_PER_TASK = 600
# Prompts for no adapter: the router abstains and the base model serves them, in the same batch.
OFF_TOPIC = ["hello, how are you?", "What is the capital of France?"]
PROMPT_WIDTH, ANSWER_WIDTH = 44, 72
WEAK_MODEL = (
    "Why the answers read poorly: a 135M-parameter model that saw mostly English, and adapters trained on 32 "
    "sentences each (perplexity 12-31% lower, not fluency); the demo shows routing and exact fused serving."
)


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


def _answer(text: str) -> str:
    text = one_line(text)
    return repr(fit(text, ANSWER_WIDTH, pad=False)) if text else "(nothing: it ends the answer at once)"


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run_real_demo(
    device: str = "cpu",
    seed: int = 0,
    quick: bool = False,
    max_new_tokens: int | None = None,
    rounds: int = 3,
) -> bool:
    """Route, generate and check against PEFT; prints each prompt's base-model answer beside the routed
    one. Returns whether every routed row matched PEFT.

    ``quick``: 8 new tokens instead of 16 and no timings (what the tests run); otherwise the base model,
    PEFT and ours are each timed over ``rounds`` interleaved runs after a warm-up, and the medians printed
    with the load average, unless the machine is busier than its cores (then no timings).
    """
    from ..generation import chat_texts, generate_routed
    from ..patch import attach
    from .peft_baseline import peft_mixed_batch

    warnings.filterwarnings("ignore", category=FutureWarning)
    if max_new_tokens is None:
        max_new_tokens = 8 if quick else 16
    load, cores = machine_load()  # before our own work adds to it
    timed = not quick and not too_busy_to_time(load, cores)
    torch.manual_seed(seed)
    paths = adapter_paths()  # before the model: a missing adapter is named at once (FileNotFoundError)
    model, tokenizer = load_smollm2(verbose=True)
    model = model.to(device)
    router = train_task_router(seed)
    print(
        f"SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32, "
        f"{device}); router held-out accuracy {router.report['heldout_accuracy']:.1%}, routing top-p "
        f"{ROUTING['p']}, at most {ROUTING['top_k']} adapters"
    )
    print(f"{len(paths)} task adapters ({', '.join(paths)}) from {next(iter(paths.values())).parent}")
    print(f"the model as a transformers folder (for dlplora generate / serve --model): {smollm2_folder()}")
    print(WEAK_MODEL)
    chat = bool(getattr(tokenizer, "chat_template", None))  # SmolLM2-135M-Instruct has one
    if chat:
        print(
            "The model reads each prompt as a user message through its chat template; the router reads it as written."
        )

    prompts, labels = demo_prompts()
    prompts, labels = prompts + OFF_TOPIC, labels + ["none"] * len(OFF_TOPIC)  # for the base model
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    selection = router.route(prompts, **ROUTING)
    tokenizer.padding_side = "left"
    model_texts = chat_texts(tokenizer, prompts) if chat else prompts
    batch = tokenizer(model_texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
    prompt_len = batch["input_ids"].shape[1]
    times: dict[str, list[float]] = {"base": [], "peft": [], "ours": []}

    start = time.perf_counter()
    peft_model, row_names = peft_mixed_batch(copy.deepcopy(model), paths, selection)
    merge_s = time.perf_counter() - start
    ours_model = copy.deepcopy(model)  # the base model stays unpatched, so the rounds can interleave
    lora = attach(ours_model, paths)
    try:
        # one run each: the answers and the check (and the warm-up of every path)
        with torch.no_grad():
            base_out = model.generate(**batch, **gen)
            peft_out = peft_model.generate(**batch, adapter_names=row_names, **gen)
            peft_logits = peft_model(**batch, adapter_names=row_names).logits
        results = generate_routed(ours_model, lora, router, tokenizer, prompts, **ROUTING, chat=chat, **gen)
        with lora.selection(selection), torch.no_grad():
            ours_logits = ours_model(**batch).logits
        # the timings: rounds interleaved, so that a busy machine slows every path alike
        runs = []
        for _ in range(rounds if timed else 0):
            with torch.no_grad():
                start = time.perf_counter()
                model.generate(**batch, **gen)
                times["base"].append(time.perf_counter() - start)
                start = time.perf_counter()
                peft_model.generate(**batch, adapter_names=row_names, **gen)
                times["peft"].append(time.perf_counter() - start)
            runs.append(
                generate_routed(ours_model, lora, router, tokenizer, prompts, **ROUTING, chat=chat, **gen)
            )
            times["ours"].append(runs[-1][0].route_s + runs[-1][0].prefill_s + runs[-1][0].decode_s)
    finally:
        lora.detach()
    base_texts = tokenizer.batch_decode(base_out[:, prompt_len:], skip_special_tokens=True)

    new_peft = peft_out[:, prompt_len:].tolist()
    logit_err = float((ours_logits - peft_logits).norm() / peft_logits.norm())
    same = [r.token_ids == t for r, t in zip(results, new_peft)]
    print(f"\n{fit('task', 8)} {fit('prompt', PROMPT_WIDTH)} {fit('adapters (weight)', 24)} =PEFT")
    for label, result, base_text, ok in zip(labels, results, base_texts, same):
        mix = ", ".join(f"{name} {weight:.2f}" for name, weight in result.adapters) or "base model"
        print(
            f"{fit(label, 8)} {fit(one_line(result.prompt), PROMPT_WIDTH)} {fit(mix, 24)} {'yes' if ok else 'NO'}"
        )
        print(f"{'':9}base model:  {_answer(base_text)}")
        if result.adapters:
            print(f"{'':9}routed:      {_answer(result.text)}")
    print(
        f"\nbatch of {len(prompts)} prompts, {max_new_tokens} new tokens each, greedy, {device}, fp32; prompt "
        f"logits vs PEFT: relative error {logit_err:.1e}; greedy tokens equal: {sum(same)}/{len(same)}"
    )
    if quick:
        print("timings: none in the quick form (one run is noise); `dlplora demo` prints medians of 3 runs")
    elif not timed:
        print(load_caveat(load, cores))
    else:
        base_s, peft_s, ours_s = (_median(times[k]) for k in ("base", "peft", "ours"))
        r0 = sorted(runs, key=lambda r: r[0].route_s + r[0].prefill_s + r[0].decode_s)[len(runs) // 2][0]
        spread = {k: f"{min(v):.2f}-{max(v):.2f} s" for k, v in times.items()}
        print(f"timings, median of {rounds} interleaved runs after a warm-up (min-max in brackets):")
        print(f"  base model alone            {base_s:7.2f} s ({spread['base']})")
        print(
            f"  PEFT, adapter_names per row {peft_s:7.2f} s ({spread['peft']}; {peft_s / base_s:.2f}x base), "
            f"after merging {len(set(row_names) - {'__base__'})} mixes in {merge_s:.1f} s"
        )
        print(
            f"  ours, routed and fused      {ours_s:7.2f} s ({spread['ours']}; {ours_s / base_s:.2f}x base, no "
            f"merging): route {r0.route_s * 1e3:.0f} ms, prefill {r0.prefill_s:.2f} s, decode {r0.decode_s:.2f} s"
        )
        print(f"  {load_caveat(load, cores)}")
    return logit_err < 1e-4 and all(same)
