"""Small offline models, tokenizers and PEFT adapters for the demo, the benchmarks and the tests.

Nothing is downloaded: the model is built from a config with random weights, the tokenizer is a
byte-level BPE trained in a second on the texts at hand, and the adapters are PEFT LoRAs with random
(non-zero) factors saved in PEFT's own format.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["build_tokenizer", "build_llama", "make_peft_adapters", "peft_mixed_batch", "load_router_texts"]

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tokenizer(texts: Sequence[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on ``texts`` (any language or script), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def build_llama(
    vocab_size: int,
    hidden: int = 256,
    intermediate: int = 688,
    layers: int = 4,
    heads: int = 4,
    seed: int = 0,
):
    """A Llama-architecture causal LM with random weights (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def make_peft_adapters(model, specs: dict[str, dict], out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Save one PEFT LoRA adapter per ``specs`` entry (name -> LoraConfig keyword arguments) under ``out_dir``.

    PEFT starts lora_B at zero (the adapter would do nothing), so both factors are drawn at random.
    Returns name -> adapter directory.
    """
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    paths = {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**spec))
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_A" in param_name or "lora_B" in param_name:
                    param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5)
        paths[name] = out_dir / name
        peft_model.save_pretrained(paths[name])
    return paths


def peft_mixed_batch(model, adapter_paths: dict[str, Path], selection: Sequence[Sequence[tuple[str, float]]]):
    """PEFT serving the same per-row mixes: each distinct mix merged with ``add_weighted_adapter``
    ("cat", the exact equivalent of a weighted sum of LoRA outputs) and run as a mixed batch.

    Returns ``(peft_model, adapter_names)``: pass ``adapter_names`` to the PEFT model's forward or
    ``generate``; rows with an empty mix get ``"__base__"``.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = list(adapter_paths)
    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(model), str(adapter_paths[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        peft_model.load_adapter(str(adapter_paths[name]), adapter_name=name)
    mixes: dict[tuple, str] = {}
    row_names = []
    for row in selection:
        if not row:
            row_names.append("__base__")
            continue
        key = tuple(row)
        if key not in mixes:
            mixes[key] = f"mix{len(mixes)}"
            peft_model.add_weighted_adapter(
                [n for n, _ in row], [w for _, w in row], adapter_name=mixes[key], combination_type="cat"
            )
            # peft copies use_rslora of the first adapter onto the merged one; the "cat" factors
            # already carry each adapter's scale, so the merged adapter's own scaling must be 1.
            for module in peft_model.modules():
                if isinstance(module, LoraLayer) and mixes[key] in module.scaling:
                    module.scaling[mixes[key]] = 1.0
        row_names.append(mixes[key])
    return peft_model.eval(), row_names


def load_router_texts() -> tuple[list[str], list[str]]:
    """The multi-language, multi-topic text set shipped with the package: (texts, task names).

    Built by bench/data/build_router_data.py from Debian's translated man pages, license texts and
    Python's standard library on the machine; see that script for sources and licenses.
    """
    import json

    path = Path(__file__).resolve().parent / "data" / "router_texts.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["task"] for r in rows]
