"""Helpers of the engine tests with several vLLM workers (test_parallel.py): a small Llama-style model
whose heads divide by 2, its adapters, and transformers + PEFT serving one request alone as the oracle.

SmolLM2-135M has 9 query and 3 key/value heads, so it cannot be split in two; the model here is built
from a config with fixed random weights (4 query heads, 2 key/value heads of 64, 4 layers), nothing is
downloaded. Its adapters are PEFT LoRAs on every projection, and ``a_flipped`` is ``a`` with the sign of
one half of every layer's sharded dimension flipped (see :func:`flip_second_half`), so a mix of ``a``
and ``a_flipped`` adds ``a`` on one tensor-parallel shard and cancels on the other.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from engine_util import ROOT, greedy_alone

# The projections vLLM splits by output (column-parallel: each shard holds some rows of B) and by input
# (row-parallel: each shard holds some columns of A and adds a partial sum before the all-reduce).
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
TINY_ADAPTERS = ("a", "b", "c", "a_flipped")
TINY_RANK = 8
# Bytes seen by the tokenizer trainer: its vocabulary only has to exist (the tests send token ids).
_TOKENIZER_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Wie geht es dir heute? Bonjour, je voudrais un café.",
] * 8


def bind_threads(workers: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``workers`` processes on this machine: one allowed CPU each
    (vLLM's ``auto`` binds one worker per NUMA node, and this machine has one)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        return "nobind"
    share = len(cpus) // workers
    return "|".join(",".join(map(str, cpus[i * share : (i + 1) * share])) for i in range(workers))


def build_tiny_llama(root: Path) -> tuple[Path, dict[str, Path]]:
    """Write the model (``root/model``, with a tokenizer) and the adapters (``root/adapters/<name>``);
    returns the model folder and name -> adapter folder. Deterministic (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlplora_triton.demo.toy_model import ALL_PROJECTIONS, build_tokenizer, make_peft_adapters

    torch.manual_seed(0)
    tokenizer = build_tokenizer(_TOKENIZER_TEXTS, vocab_size=400)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # Larger than Llama's 0.02, so that greedy choices are not near-ties that a different order of
        # summation (a sharded matmul plus an all-reduce) could flip.
        initializer_range=0.08,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    spec = dict(r=TINY_RANK, lora_alpha=2 * TINY_RANK, target_modules=list(ALL_PROJECTIONS))
    paths = make_peft_adapters(model, {n: spec for n in ("a", "b", "c")}, root / "adapters", seed=1)
    paths["a_flipped"] = flip_second_half(paths["a"], root / "adapters" / "a_flipped")
    return model_dir, paths


def flip_second_half(adapter: Path, out: Path) -> Path:
    """A copy of ``adapter`` whose second half of each sharded dimension has its sign flipped: the rows
    of B (outputs) of column-parallel projections, the columns of A (inputs) of row-parallel ones.
    With tensor parallelism 2 that half is exactly the second shard's."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    for name, tensor in weights.items():
        module = name.split(".lora_")[0].rsplit(".", 1)[-1]
        if module in COLUMN_PARALLEL and ".lora_B." in name:
            tensor[tensor.shape[0] // 2 :] *= -1
        elif module in ROW_PARALLEL and ".lora_A." in name:
            tensor[:, tensor.shape[1] // 2 :] *= -1
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


class TinyReference:
    """transformers + PEFT holding the tiny model's adapters: greedy tokens with their log-probs, and
    teacher-forced log-probs, of one row alone under a mix (``[]``: the base model)."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]):
        import torch
        from transformers import AutoModelForCausalLM

        sys.path.insert(0, str(ROOT / "tests"))  # the model-level tests' PEFT oracle
        from peft_helpers import PeftOracle

        torch.set_num_threads(1)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.oracle = PeftOracle(base, {name: str(path) for name, path in adapters.items()})

    def greedy(self, ids: list[int], mix, max_tokens: int) -> tuple[list[int], list[float]]:
        return greedy_alone(self.oracle, ids, mix, max_tokens)

    def prompt_logprobs(self, ids: list[int], mix) -> list[float]:
        import torch

        with self.oracle.active(list(mix)), torch.no_grad():
            logits = self.oracle.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1)
        return logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
