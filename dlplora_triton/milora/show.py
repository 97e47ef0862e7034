"""How ``dlplora milora-gates`` shows a MiLoRA's gates: :func:`format_gates` (pure text; the command,
which attaches the MiLoRA and runs the prefill, is ``dlplora_triton.commands.milora_gates``)."""

from __future__ import annotations

from collections.abc import Sequence

from .._moved import moved_names

__all__ = ["format_gates"]

# Names that moved to dlplora_triton.commands.milora_gates (0.2.0): still importable from here, with a
# DeprecationWarning, until the next minor release.


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


# Moved in 0.2.
__getattr__ = moved_names(
    __name__,
    {
        "prompt_gates": "dlplora_triton.commands.milora_gates:prompt_gates",
        "gates_main": "dlplora_triton.commands.milora_gates:show_gates",
    },
)
