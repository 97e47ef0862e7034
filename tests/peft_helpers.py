"""Tiny transformers models, PEFT adapters and the PEFT oracle shared by the model-level tests.

For a batch row selecting ``[(a, wa), (b, wb)]`` the oracle is PEFT's model with
``add_weighted_adapter([a, b], [wa, wb], combination_type="cat")`` active, run on that row alone.
(peft 0.21 copies ``use_rslora`` of the first adapter onto the merged one, so the merged adapter's
scaling is reset to 1 on every module; "cat" with a single adapter falls back to PEFT's "linear"
merge, so a one-adapter row is compared with the adapter itself, its scaling times the weight.)
"""

import copy
import math
import warnings
from contextlib import contextmanager

import torch
import transformers
from peft import PeftModel
from torch import nn


def save_adapter(
    base: nn.Module, path, seed: int = 0, safe: bool = True, scale: float = 1.0, **config
) -> str:
    """A PEFT LoRA adapter of ``base`` with random A and B (PEFT initialises B to zero: the adapter
    would do nothing) of standard deviation ``scale``, saved to ``path``; returns the path."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    model.save_pretrained(str(path), safe_serialization=safe)
    return str(path)


VOCAB = 97

# ---------------------------------------------------------------------------------------------- models

_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _build(arch: str) -> nn.Module:
    t = transformers
    if arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**_DECODER))
    if arch == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**_DECODER))
    if arch == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**_DECODER))
    if arch == "gemma":
        return t.GemmaForCausalLM(t.GemmaConfig(head_dim=8, **_DECODER))
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return t.Phi3ForCausalLM(t.Phi3Config(**_DECODER))
    if arch == "gpt2":  # Conv1D, weight [in, out]
        config = t.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
        )
        return t.GPT2LMHeadModel(config)
    if arch == "bert":  # encoder; its pooler's dense layer sees [B, H] inputs
        config = t.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            pad_token_id=0,
        )
        return t.BertModel(config)
    raise ValueError(arch)


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny model with weights large enough that logits are well separated (greedy decoding is stable)."""
    torch.manual_seed(seed)
    model = _build(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                fan_in = p.shape[0] if "c_" in name and "gpt2" in type(model).__name__.lower() else p.shape[1]
                p.normal_(
                    0.0, 1.0 if "emb" in name or "wte" in name or "wpe" in name else 1.0 / math.sqrt(fan_in)
                )
    return model.eval()


def run(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids, **kwargs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


class PeftOracle:
    """PEFT model holding the same adapters; logits of one row under a weighted mix of them."""

    def __init__(self, base: nn.Module, paths: dict[str, str]):
        names = list(paths)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = PeftModel.from_pretrained(
                copy.deepcopy(base), paths[names[0]], adapter_name=names[0]
            )
            for name in names[1:]:
                self.model.load_adapter(paths[name], adapter_name=name)
        self.model.eval()
        self.mixes = 0

    def _lora_modules(self, adapter: str):
        return [
            m
            for m in self.model.modules()
            if isinstance(getattr(m, "scaling", None), dict) and adapter in m.scaling
        ]

    @contextmanager
    def active(self, row):
        if not row:
            with self.model.disable_adapter():
                yield
            return
        if len(row) == 1:
            ((name, weight),) = row
            modules = self._lora_modules(name)
            saved = [m.scaling[name] for m in modules]
            for m in modules:
                m.scaling[name] *= weight
            self.model.set_adapter(name)
            try:
                yield
            finally:
                for m, s in zip(modules, saved):
                    m.scaling[name] = s
            return
        self.mixes += 1
        mix = f"mix{self.mixes}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.add_weighted_adapter(
                [n for n, _ in row], [w for _, w in row], adapter_name=mix, combination_type="cat"
            )
        for m in self._lora_modules(mix):
            m.scaling[mix] = 1.0  # see the module docstring (rsLoRA flag copied onto the merged adapter)
        self.model.set_adapter(mix)
        try:
            yield
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model.delete_adapter(mix)

    def logits(self, row, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        with self.active(row):
            return run(self.model, ids, **kwargs)

    def generate(self, row, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        with self.active(row), torch.no_grad():
            return self.model.generate(input_ids=ids, **kwargs)
