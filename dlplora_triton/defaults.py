"""The package's defaults that more than one part reads: the API, the ``dlplora`` commands, ``dlplora
serve`` and the routed server. Plain constants, no torch import: the command line reads them before it
parses (``dlplora --help`` stays fast)."""

from __future__ import annotations

__all__ = [
    "AUTO_NAME",
    "BASE_THRESHOLD",
    "CROP_MAX_UNITS",
    "DEFAULT_P",
    "DEFAULT_WEIGHTING",
    "IMPORTANCE_KINDS",
    "MIN_TEXTS_PER_TASK",
    "ROUTER_MIN_ADAPTER_ACCURACY",
    "ROUTER_MIN_BACKGROUND_TO_BASE",
    "ROUTER_MIN_HELDOUT_ACCURACY",
    "SERVE_TOP_K",
    "SHAPE_NGRAMS",
    "SHORT_CROPS_PER_TEXT",
    "WEIGHTINGS",
]

# The package's one default top-p (the API, the dlplora commands, the demo, dlplora serve). Chosen from the
# SmolLM2 experiment (docs/real-model.md): on composite texts p = 0.8 gets most of the gain of mixing over
# top-1 routing (-2.3% perplexity; p = 0.9: -2.8%, p = 0.6: -0.7%) with 1.42 adapters per text instead of
# 1.92 at p = 0.9, and on single-task texts it stays at the oracle (-0.2%; 1.04 adapters per text).
DEFAULT_P = 0.8
# How the kept adapters' probabilities become fusion weights (top_p_select): "renorm" divides them by
# their sum, "softmax" takes their softmax (DLP-LoRA's published code).
WEIGHTINGS = ("renorm", "softmax")
DEFAULT_WEIGHTING = "renorm"
# The base model serves a text whose background probability is at least this (docs/routing.md).
BASE_THRESHOLD = 0.3
# Router.train's shape n-grams (dlplora_triton/routing/features.py, text_shape): (min, max) lengths, or None.
# Measured by bench/bench_router_lengths.py (bench/results/cpu/router_lengths.json; docs/routing.md, "Short
# prompts"): on, prompts of 1-3 words reach a wrong adapter half as often (2.4% / 2.3% against 4.5% /
# 3.7% at seeds 0 / 1), one-line code never does (0 against 1.25% / 0.4%), `def fib(n):` reaches code, at
# equal or better held-out accuracy and general prompts to the base model.
SHAPE_NGRAMS = (2, 4)
# Router.train adds, per training text, this many crops of 1 to CROP_MAX_UNITS words (a CJK character is
# one), labelled as their text (dlplora_triton/routing/augment.py). Off by default: with shapes, 2 crops
# per text brought more prompts of 1-3 words to their adapter (86-88% against 83%) but fewer general
# prompts to the base model (test set 96.0% against 97.6-99.2%) and a lower held-out accuracy (98.2%
# against 98.7-98.9%), for 2.9x the training rows.
SHORT_CROPS_PER_TEXT = 0
CROP_MAX_UNITS = 6
# Router.train lists in router.report["warnings"], and `dlplora train-router` prints on stderr, what falls
# below these (docs/routing.md, "How much data"; bench/results/cpu/router_data_size.json: 2, 6 and 9
# tasks, 12 to 200 texts each, 2 seeds, the 835 general prompts as background). Every router trained on
# 12 or 25 texts per task fell below at least one of the three figures (held-out accuracy 2-88%, or
# adapter-task texts to their adapter 33-83%, or background texts to the base model 0-76%); every router
# from 50 texts per task measured 93-100%, 90-100% and 88-100%.
MIN_TEXTS_PER_TASK = 50
ROUTER_MIN_HELDOUT_ACCURACY = 0.90
ROUTER_MIN_ADAPTER_ACCURACY = 0.85  # 90% is 27 of 30: 5 held-out texts x 6 adapter tasks
ROUTER_MIN_BACKGROUND_TO_BASE = 0.85
# `dlplora serve --top-k`: at most this many adapters in a routed mix (and vLLM's --max-loras unless given).
SERVE_TOP_K = 3
# The model name that asks the routed server to route a request (`dlplora serve --auto-name`).
AUTO_NAME = "auto"
# How `dlplora finetune` scores a module's rank units (docs/dynamic-rank.md).
IMPORTANCE_KINDS = ("sensitivity", "grad_norm")
