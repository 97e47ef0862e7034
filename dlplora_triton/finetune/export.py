"""What fine-tuning writes: the PEFT adapter directory (config with per-module rank / alpha patterns,
safetensors, the gate apart), the rank history as CSV and as a plot."""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .dynamic import DynamicLoRA

__all__ = [
    "peft_config",
    "save_pretrained",
    "write_rank_csv",
    "plot_ranks",
    "GATE_FILE",
    "GATE_NOTE",
    "META_FILE",
]

GATE_FILE = "dlplora_input_gate.safetensors"
META_FILE = "dlplora_dynamic.json"
GATE_NOTE = (
    f"note: the input gate is saved apart in {GATE_FILE}; PEFT (and dlplora's attach) ignore that file, "
    "so the adapter loaded from this directory computes the gate-off model (g = 1)."
)
_PEFT_PREFIX = "base_model.model."


def peft_config(dyn: DynamicLoRA, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` contents for the current ranks (PEFT LoRA, per-module patterns)."""
    ranks = dyn.ranks
    counts = Counter(ranks.values())
    r_default = min(counts, key=lambda r: (-counts[r], r))  # the most common rank
    rank_pattern = {p: r for p, r in ranks.items() if r != r_default}
    alpha_pattern = {p: dyn.scale * r for p, r in rank_pattern.items()}
    # PEFT picks the first pattern key k with re.match(rf"(.*\.)?({k})$", path): check that every
    # module resolves to its own key (or to none, when it has the default rank).
    for path in dyn.paths:
        key = next((k for k in rank_pattern if re.match(rf"(.*\.)?({k})$", path)), None)
        if key is not None and key != path or key is None and path in rank_pattern:
            raise RuntimeError(f"rank_pattern key {key!r} would also match module {path!r}; cannot export")
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_default,
        "lora_alpha": dyn.scale * r_default,
        "target_modules": dyn.target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": dyn.modules_to_save or None,
    }


def save_pretrained(
    dyn: DynamicLoRA, path: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write a PEFT LoRA adapter directory for the current ranks (+ the gate apart, see :data:`GATE_NOTE`).

    ``adapter_config.json`` (``r``/``lora_alpha`` = the most common rank and its alpha,
    ``rank_pattern``/``alpha_pattern`` for the others, so every module's ``alpha_i / r_i`` is the
    training scale), ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` /
    ``lora_B.weight`` and the ``modules_to_save`` tensors), and ``dlplora_dynamic.json`` (budget,
    schedule, rank history). With gates, ``dlplora_input_gate.safetensors`` too, and a warning.
    """
    from safetensors.torch import save_file

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"adapter output {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    config = peft_config(dyn, base_model_name_or_path)
    tensors = {}
    for p, layer in dyn.layers.items():
        tensors[f"{_PEFT_PREFIX}{p}.lora_A.weight"] = layer.lora_A.detach().float().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{p}.lora_B.weight"] = layer.lora_B.detach().float().cpu().contiguous()
    for p in dyn.save_paths:
        for name, t in dyn.model.get_submodule(p).state_dict().items():
            tensors[f"{_PEFT_PREFIX}{p}.{name}"] = t.detach().cpu().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    meta = {
        "method": "dlplora dynamic LoRA (rank reallocation under a fixed budget)",
        "budget": dyn.budget,
        "scale": dyn.scale,
        "importance": dyn.importance,
        "beta1": dyn.beta1,
        "beta2": dyn.beta2,
        "moves": dyn.moves,
        "max_rank": dyn.max_rank,
        "schedule": None if dyn.schedule is None else dyn.schedule.as_dict(),
        "modules": list(dyn.paths),
        "ranks": dyn.ranks,
        "history": dyn.history,
        "input_gate": None,
    }
    (out / GATE_FILE).unlink(missing_ok=True)
    if dyn.has_gate:
        gate = {}
        for p, layer in dyn.layers.items():
            for name, t in layer.input_gate.state_dict().items():
                gate[f"{p}.input_gate.{name}"] = t.detach().float().cpu().reshape(-1).contiguous()
        save_file(gate, str(out / GATE_FILE), metadata={"format": "pt"})
        meta["input_gate"] = {
            "file": GATE_FILE,
            "formula": "g(x) = 2 * sigmoid(u . x / (rms(x) * sqrt(K)) + c * log rms(x) + b), "
            "rms(x) = sqrt(mean(x^2) + 1e-6); delta = scale * g(x) * B A x",
            "note": GATE_NOTE,
        }
        warnings.warn(GATE_NOTE, UserWarning, stacklevel=3)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def write_rank_csv(dynamic: DynamicLoRA, path: str | os.PathLike) -> None:
    """CSV of the rank history: one row per (reallocation step, module) with rank and score."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "module", "rank", "score"])
        for entry in dynamic.history:
            for module, rank, score in zip(dynamic.paths, entry["ranks"], entry["scores"]):
                writer.writerow([entry["step"], module, rank, f"{score:.6g}"])


def _layer_index(path: str) -> int | None:
    m = re.search(r"\.(\d+)\.", "." + path + ".")
    return int(m.group(1)) if m else None


def plot_ranks(
    paths: Sequence[str], history: Sequence[dict], out: str | os.PathLike, title: str = ""
) -> None:
    """PNG: rank of every module vs step (heat map) and total rank per layer vs step (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    ranks = torch.tensor([h["ranks"] for h in history], dtype=torch.float32)  # [events, modules]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.22 * len(paths) + 1.5)))
    image = ax0.imshow(ranks.T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax0.set_yticks(range(len(paths)))
    ax0.set_yticklabels([_short(p) for p in paths], fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
    ax0.set_xticks(ticks)
    ax0.set_xticklabels([str(steps[i]) for i in ticks])
    ax0.set_xlabel("optimizer step (at each reallocation)")
    ax0.set_title("rank per module")
    fig.colorbar(image, ax=ax0)
    layers: dict = {}
    for i, p in enumerate(paths):
        layers.setdefault(_layer_index(p), []).append(i)
    for layer, idx in sorted(layers.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        label = f"layer {layer}" if layer is not None else "other"
        ax1.step(steps, ranks[:, idx].sum(1).numpy(), where="post", label=label)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("sum of ranks in the layer")
    ax1.set_title("rank per layer")
    ax1.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _short(path: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query``."""
    m = re.search(r"\.(\d+\..*)$", path)
    return m.group(1) if m else path
