"""Dynamic-rank LoRA fine-tuning (after Liao et al., arXiv 2501.14859; docs/dynamic-rank.md).

- :mod:`.layers`: :class:`DynamicLoRALinear`, :class:`InputGate`;
- :mod:`.importance`: :class:`RankSchedule`, the smoothed importance scores, the moves of a reallocation;
- :mod:`.ranks`: grow / SVD shrink of one module and its optimizer state;
- :mod:`.targets`: which modules are adapted (PEFT's rule) or trained in full;
- :mod:`.dynamic`: :class:`DynamicLoRA`, the controller;
- :mod:`.export`: the PEFT adapter directory, the rank CSV and plot;
- :mod:`.callback`: :class:`DynamicLoRACallback` for ``transformers.Trainer``;
- :mod:`.command`: what ``dlplora finetune`` runs (:func:`finetune`; its parser and
  ``finetune_main``: ``dlplora_triton.commands.finetune``).
"""

from .._moved import moved_names
from .callback import DynamicLoRACallback
from .command import pad_token_ids, read_checkpoint
from .dynamic import DynamicLoRA
from .export import GATE_FILE, GATE_NOTE, plot_ranks, write_rank_csv
from .importance import IMPORTANCE_KINDS, RankSchedule
from .layers import DynamicLoRALinear, InputGate
from .targets import match_target_modules

__all__ = [
    "DynamicLoRA",
    "DynamicLoRALinear",
    "InputGate",
    "RankSchedule",
    "DynamicLoRACallback",
    "match_target_modules",
    "write_rank_csv",
    "plot_ranks",
    "read_checkpoint",
    "pad_token_ids",
    "GATE_FILE",
    "GATE_NOTE",
    "IMPORTANCE_KINDS",
]


# Moved in 0.2.
__getattr__ = moved_names(
    __name__,
    {
        "finetune_main": "dlplora_triton.commands.finetune:finetune_main",
    },
)
