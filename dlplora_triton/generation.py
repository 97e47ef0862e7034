"""Route once at prefill, reuse through decode (after MiLoRA).

:func:`generate_routed` takes a model with attached adapters, a router and a batch of prompts. Every
prompt is routed once, before the first new token; the whole batch is then generated together with
the KV cache on, one forward per step for all rows, each row applying its own adapter mix. The
attached layers build their plan once per distinct tokens-per-row (prefill, then decode) and reuse it
at every step: there is no per-row loop and no re-routing per token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .defaults import DEFAULT_P

__all__ = ["RoutedGeneration", "chat_texts", "generate_routed"]


@dataclass
class RoutedGeneration:
    """One prompt's result: the generated text, its adapter mix (``[]``: the base model served it) and
    the batch's timings (seconds)."""

    prompt: str
    text: str
    adapters: list[tuple[str, float]]
    token_ids: list[int] = field(repr=False)
    route_s: float  # routing the whole batch (shared by its prompts)
    prefill_s: float  # the first forward of the batch, up to the first new token
    decode_s: float  # every later step of the batch


class _FirstTokenClock:
    """A logits processor that only notes when it is first called: the end of the prefill forward."""

    def __init__(self):
        self.first_call = None

    def __call__(self, input_ids, scores):
        if self.first_call is None:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.first_call = time.perf_counter()
        return scores


def chat_texts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """Each prompt as one user message through ``tokenizer``'s chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True: the tokenizer has no chat template (pass chat=False for a base model)")
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        for prompt in prompts
    ]


def generate_routed(
    model,
    lora,
    router,
    tokenizer,
    prompts: Sequence[str],
    p: float = DEFAULT_P,
    top_k: int | None = None,
    weighting: str = "renorm",
    min_confidence: float | None = None,
    base_threshold: float | None = None,
    chat: bool = False,
    **generate_kwargs,
) -> list[RoutedGeneration]:
    """Route every prompt once, then generate the whole batch in one ``model.generate`` call.

    Args:
        model: a transformers causal LM with adapters attached (``lora = dlp.attach(model, ...)``).
        lora: the handle ``attach`` returned; every router task name must be one of ``lora.names``.
        router: a trained :class:`dlplora_triton.Router`.
        tokenizer: the model's tokenizer; prompts are left-padded (its padding side is restored).
        prompts: the batch, a list of strings.
        p, top_k, weighting, min_confidence, base_threshold: routing options (see ``Router.route``).
            A prompt the router abstains on (its background probability at least ``base_threshold``,
            default the router's; or its top adapter probability below ``min_confidence``) runs on the
            base model, in the same batch: its result has ``adapters == []``.
        chat: the model reads each prompt as one user message through the tokenizer's chat template
            (what an Instruct model was tuned on; without it a question may end its answer at once).
            The router still reads the prompt itself.
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``, ...).

    Returns one :class:`RoutedGeneration` per prompt, in order.
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(t, str) for t in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    missing = [name for name in router.names if name not in lora.names]
    if missing:
        raise KeyError(f"router tasks {missing} have no attached adapter (attached: {list(lora.names)})")
    model_texts = chat_texts(tokenizer, prompts) if chat else prompts

    start = time.perf_counter()
    selection = router.route(
        prompts,
        p=p,
        top_k=top_k,
        weighting=weighting,
        min_confidence=min_confidence,
        base_threshold=base_threshold,
    )
    route_s = time.perf_counter() - start

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    try:
        # the template writes the special tokens itself (SmolLM2's <|im_start|>): none added twice
        batch = tokenizer(model_texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = padding_side
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if tokenizer.pad_token_id is not None:
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)

    clock = _FirstTokenClock()
    processors = list(generate_kwargs.pop("logits_processor", None) or [])
    from transformers import LogitsProcessorList

    with lora.selection(selection):
        start = time.perf_counter()
        output = model.generate(
            **batch, logits_processor=LogitsProcessorList([clock, *processors]), **generate_kwargs
        )
        if output.is_cuda:
            torch.cuda.synchronize(output.device)
        end = time.perf_counter()
    first = clock.first_call or end
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [
        RoutedGeneration(prompt, text, row, ids.tolist(), route_s, first - start, end - first)
        for prompt, text, row, ids in zip(prompts, texts, selection, new_tokens)
    ]
