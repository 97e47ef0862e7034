"""Serving stacks on dlplora_triton's kernels.

- ``dlplora_triton.integrations.vllm``: vLLM's LoRA backend (a punica wrapper), registered by the
  ``vllm.general_plugins`` entry point ``dlplora``; weighted mixes of loaded adapters per request
  (offline and as the OpenAI server's ``mix:`` model names) and per-token routes. See docs/vllm.md.

Nothing here is imported by ``import dlplora_triton``: the submodules import vLLM, which stays optional.
"""
