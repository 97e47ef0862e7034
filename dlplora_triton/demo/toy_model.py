"""The random-weight demo's model, tokenizer and adapters (the tests and bench_generation use them too).

Nothing is downloaded: the model is built from a config with random weights, the tokenizer is a
byte-level BPE trained in a second on the texts at hand, and the adapters are PEFT LoRAs with random
(non-zero) factors saved in PEFT's own format.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["ALL_PROJECTIONS", "build_tokenizer", "build_llama", "make_peft_adapters"]

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
