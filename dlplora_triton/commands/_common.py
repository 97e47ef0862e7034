"""What several commands share: the default device, the checks of ``--model`` and ``--milora`` folders."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEVICE_HELP", "check_milora_folder", "check_model_folder", "device_of"]

DEVICE_HELP = "torch device (default: cuda if present)"


def device_of(args) -> str:
    """``args.device``, or ``"cuda"`` when CUDA is present and ``"cpu"`` otherwise (decided in ``run``, not
    when the parser is built: asking CUDA needs torch)."""
    if args.device is not None:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_folder(path: str, adapters_flag: str) -> None:
    """``--model`` must be a transformers model folder; a clear error for an adapter folder or a file."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"--model {path!r} does not exist")
    if not folder.is_dir():
        raise ValueError(
            f"--model {path!r} is a file; it takes a transformers model folder (config.json, weights, tokenizer)"
        )
    if (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        what = "a MiLoRA folder" if (folder / "milora_config.json").is_file() else "a PEFT adapter folder"
        raise ValueError(
            f"--model {path!r} is {what}, not a model: --model takes the base model's folder (config.json, "
            f"weights, tokenizer) and the adapter goes to {adapters_flag}"
        )
    raise ValueError(f"--model {path!r} has no config.json: it is not a transformers model folder")


def check_milora_folder(path: str) -> None:
    """``--milora`` must be a folder written by ``MiLoRA.save``."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"--milora {path!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"--milora {path!r} is a file; it takes a folder written by MiLoRA.save")
    if (folder / "milora_config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"--milora {path!r} is a plain PEFT LoRA adapter (no milora_config.json), which has no per-layer "
            "gates; milora-gates reads a folder written by MiLoRA.save (serve a plain adapter with dlplora "
            "generate --adapter NAME=DIR)"
        )
    raise ValueError(
        f"--milora {path!r} has no milora_config.json: it is not a folder written by MiLoRA.save"
    )
