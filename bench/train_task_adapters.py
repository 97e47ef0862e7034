"""Train one PEFT LoRA per task on SmolLM2-135M-Instruct (CPU), saved under dlplora_triton/data/adapters/smollm2/<task>/.

Each adapter learns next-token prediction on its task's training texts (dlplora_triton.demo.tasks),
one sentence per example (up to --max-tokens tokens), AdamW, a short linear-decay schedule. Ranks,
target modules and layer ranges differ across tasks; only upper layers are adapted, so backward stops
at the lowest adapted layer. Each folder gets ``training_log.json``: the spec, the loss curve, held-out
perplexity of the base model and of the adapter on 40 held-out texts, the wall time and the versions.

    .venv/bin/python bench/train_task_adapters.py [--tasks de fr] [--texts 32] [--epochs 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from common import input_of_layer  # noqa: E402

from dlplora_triton.demo.smollm2 import MODEL_NAME, load_smollm2  # noqa: E402
from dlplora_triton.demo.tasks import ADAPTERS_DIR, TASKS, load_texts, task_split  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Per task: rank, targets, rsLoRA; harder scripts get more capacity. Every adapter adapts layers 24..29:
# PEFT's add_weighted_adapter (the oracle the tests and the bench compare with) gives the merged adapter
# the first adapter's layers_to_transform, and fails or drops layers when the adapters' ranges differ.
FIRST_LAYER = 24
SPECS = {
    "de": {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "fr": {"r": 8, "target_modules": ATTN},
    "ru": {"r": 16, "target_modules": ATTN + MLP, "use_rslora": True},
    "ja": {
        "r": 16,
        "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    },
    "zh": {"r": 12, "target_modules": ["v_proj", "o_proj", "gate_proj", "up_proj"]},
    "code": {"r": 4, "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"]},
}
NUM_LAYERS = 30


def _batches(tokenizer, texts: list[str], max_tokens: int):
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


@torch.no_grad()
def heldout_nll(
    model, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 20
) -> tuple[float, int]:
    """Mean next-token negative log-likelihood over the tokens of ``texts``, and the token count."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        ids, mask, labels = _batches(tokenizer, texts[i : i + batch_size], max_tokens)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=-100, reduction="sum"
        )
        total, count = total + float(nll), count + int((target != -100).sum())
    return total / count, count


def train_task(name: str, base, tokenizer, train: list[str], held: list[str], args) -> dict:
    from peft import LoraConfig, get_peft_model

    spec = dict(SPECS[name])
    first = FIRST_LAYER
    config = LoraConfig(
        lora_alpha=2 * spec["r"],
        lora_dropout=0.0,
        layers_to_transform=list(range(first, NUM_LAYERS)),
        task_type="CAUSAL_LM",
        **spec,
    )
    torch.manual_seed(args.seed)
    rng = random.Random(f"{args.seed}-{name}")
    eval_texts = held[: args.eval_texts]
    start = time.perf_counter()
    base_nll, n_tokens = heldout_nll(base, tokenizer, eval_texts, args.max_tokens)
    # The layers below `first` are frozen and not adapted: their output (the input of layer `first`) is
    # computed once per training text and the upper layers alone are trained on it for a few epochs.
    pool = sorted(rng.sample(train, args.texts), key=len)  # batches of similar lengths: little padding
    batches = []
    for i in range(0, len(pool), args.batch_size):
        ids, mask, labels = _batches(tokenizer, pool[i : i + args.batch_size], args.max_tokens)
        batches.append((input_of_layer(base, first, ids, mask), mask, labels))
    cache_s = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.0, 1 - s / steps))
    decoder = base.model
    all_layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(all_layers)[first:])  # the same (wrapped) modules, upper ones
    losses = []
    model.train()
    try:
        for epoch in range(args.epochs):
            for b in rng.sample(range(len(batches)), len(batches)):
                hidden, mask, labels = batches[b]
                loss = base(inputs_embeds=hidden, attention_mask=mask, labels=labels, use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(round(loss.item(), 4))
            print(
                f"  {name} epoch {epoch} mean loss {sum(losses[-len(batches) :]) / len(batches):.3f}  "
                f"{time.perf_counter() - start:6.0f} s",
                flush=True,
            )
    finally:
        decoder.layers = all_layers
    train_s = time.perf_counter() - start
    model.eval()
    lora_nll, _ = heldout_nll(model, tokenizer, eval_texts, args.max_tokens)
    out = Path(args.out) / name
    model.save_pretrained(out)
    # PEFT writes the checkpoint it was given; name the model the adapters belong to.
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = MODEL_NAME
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's blank model card, naming the local cache folder
    model.unload()  # the LoRA layers leave the shared base model untouched for the next task
    env = common.environment("cpu", packages=("transformers", "peft"))
    log = {
        "task": name,
        "base_model": MODEL_NAME,
        "spec": {**SPECS[name], "lora_alpha": 2 * spec["r"], "layers": [first, NUM_LAYERS - 1]},
        "trainable_parameters": sum(p.numel() for p in params),
        "train_texts": len(train),
        "texts_used": len(pool),
        "epochs": args.epochs,
        "steps": steps,
        "cache_seconds": round(cache_s, 1),
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(train_s, 1),
        "threads": torch.get_num_threads(),
        "loss_curve": losses,
        "heldout": {
            "texts": len(eval_texts),
            "tokens": n_tokens,
            "base_perplexity": round(math.exp(base_nll), 3),
            "adapter_perplexity": round(math.exp(lora_nll), 3),
        },
        "environment": env,
        "versions": {k: env[k] for k in ("torch", "transformers", "peft", "python")},  # older logs' keys
        "date": env["date"],
    }
    common.write_json(out / "training_log.json", log)
    print(
        f"{name}: {train_s:.0f} s, held-out perplexity {log['heldout']['base_perplexity']:.2f} (base) -> "
        f"{log['heldout']['adapter_perplexity']:.2f} (adapter)",
        flush=True,
    )
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--texts", type=int, default=32, help="training texts per task")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--eval-texts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ADAPTERS_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tokenizer = load_smollm2(verbose=True)
    for p in base.parameters():
        p.requires_grad_(False)
    train, held = task_split(*load_texts())
    for name in args.tasks:
        train_task(name, base, tokenizer, train[name], held[name], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
