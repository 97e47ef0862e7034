"""``dlplora milora-gates``: the LoRA modules a saved MiLoRA picks in each layer for given prompts."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ._common import DEVICE_HELP, check_milora_folder, check_model_folder, device_of

__all__ = ["HELP", "DESCRIPTION", "build_parser", "run", "prompt_gates", "show_gates"]

HELP = "print the LoRA modules a saved MiLoRA picks in each layer for each prompt"
DESCRIPTION = None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dlplora milora-gates", description=DESCRIPTION)
    parser.add_argument(
        "--model", required=True, help="a local transformers causal-LM folder (model + tokenizer)"
    )
    parser.add_argument("--milora", required=True, help="a folder written by MiLoRA.save")
    parser.add_argument("prompts", nargs="+", help="one or more prompts")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser


def run(args: argparse.Namespace) -> int:
    check_model_folder(args.model, "--milora")
    check_milora_folder(args.milora)
    return show_gates(args.model, args.milora, args.prompts, device_of(args), args.json)


def prompt_gates(model, tokenizer, milora_dir: str | os.PathLike, prompts: Sequence[str]) -> dict:
    """Attach ``milora_dir`` to ``model`` as ``"mi"``, run one prefill of ``prompts`` (left-padded) and
    return ``{"layers_path", "modules", "gates": [B, layers, modules] list}``; the model is detached after."""
    import torch

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


def show_gates(model_dir: str, milora_dir: str, prompts: Sequence[str], device: str, as_json: bool) -> int:
    """Load a transformers model folder (model + tokenizer), print the gates ``milora_dir`` gives ``prompts``."""
    from ..milora.show import format_gates

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
