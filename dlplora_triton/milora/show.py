"""``dlplora milora-gates``: the LoRA modules a saved MiLoRA picks in each layer for given prompts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["prompt_gates", "format_gates", "gates_main"]


def prompt_gates(model, tokenizer, milora_dir: str | os.PathLike, prompts: Sequence[str]) -> dict:
    """Attach ``milora_dir`` to ``model`` as ``"mi"``, run one prefill of ``prompts`` (left-padded) and
    return ``{"layers_path", "modules", "gates": [B, layers, modules] list}``; the model is detached after."""
    from ..patch import attach

    if not prompts:
        raise ValueError("give at least one prompt")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = attach(model, {"mi": milora_dir})
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
        device = next(model.parameters()).device
        with lora.selection([[("mi", 1.0)]] * len(prompts)), torch.no_grad():
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            gates = lora.gates("mi")
        served = lora._milora["mi"]
        return {
            "layers_path": served.config.layers_path,
            "modules": list(served.config.modules),
            "gates": gates.cpu().tolist(),
        }
    finally:
        lora.detach()


def format_gates(prompts: Sequence[str], result: dict) -> str:
    """One block per prompt: per layer, the chosen modules and their gates, highest first."""
    lines = []
    modules = result["modules"]
    for prompt, per_layer in zip(prompts, result["gates"]):
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        lines.append(f"{short!r}:")
        for i, gates in enumerate(per_layer):
            chosen = sorted(((g, m) for g, m in zip(gates, modules) if g > 0), reverse=True)
            picks = ", ".join(f"{m} {g:.3f}" for g, m in chosen)
            lines.append(f"  layer {i:>2}: {picks}")
    return "\n".join(lines)


def gates_main(model_dir: str, milora_dir: str, prompts: Sequence[str], device: str, as_json: bool) -> int:
    """The command: load a transformers model folder (model + tokenizer), print the gates."""
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model folder {model_dir!r} does not exist")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    except OSError as err:
        raise ValueError(
            f"cannot load a model and tokenizer from {model_dir!r}: {str(err).splitlines()[0]}"
        ) from None
    result = prompt_gates(model, tokenizer, milora_dir, prompts)
    if as_json:
        rows = [{"prompt": p, "gates": g} for p, g in zip(prompts, result["gates"])]
        print(json.dumps({"modules": result["modules"], "prompts": rows}, ensure_ascii=False))
    else:
        print(format_gates(prompts, result))
    return 0
