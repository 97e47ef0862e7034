"""Routing: the DLP-LoRA sentence router and top-p / top-k adapter selection (docs/routing.md; the words: docs/glossary.md).

- :mod:`.select`: :func:`top_p_select`, probabilities ``[B, L]`` -> selection
  tensors ``(ids [B, P], weights [B, P])``;
- :mod:`.features`: text normalisation, hashed n-grams (:func:`featurize`), :func:`pooled_hidden_states`;
- :mod:`.net`: the mini-MLP (``RouterNet``), the classes -> adapters mapping (:data:`GENERAL`,
  :data:`BASE_THRESHOLD`), the argument checks: what the next three share;
- :mod:`.router`: :class:`Router` (inference, abstention, ``route``; ``train``, ``save``, ``load``);
- :mod:`.train`: :func:`train_router` (what ``Router.train`` runs), :func:`format_report` and
  :func:`general_prompts` (the default background texts);
- :mod:`.files`: the saved router's folder (``save_router`` / ``load_router``, what ``Router.save`` /
  ``Router.load`` run), :data:`FORMAT_VERSION`, :data:`CONFIG_FILE`, :data:`WEIGHTS_FILE`;
- :mod:`.update`: ``add_task`` / ``without_adapter`` (what ``Router.add_task`` / ``Router.without_adapter``
  run): a task added in seconds against the router's replay sample.

Imports point one way: ``router`` imports ``train``, ``files``, ``update`` and ``net``; ``train`` and
``files`` import ``update`` (the replay sample) and ``net``; ``update`` imports ``net``; ``net`` imports
none of them.
"""

from ..readers import read_labelled_jsonl
from .features import featurize, pooled_hidden_states
from .files import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE
from .net import BASE_THRESHOLD, GENERAL
from .router import Router, train_router
from .top_p import DEFAULT_P, WEIGHTINGS, top_p_select
from .train import format_report, general_prompts

__all__ = [
    "top_p_select",
    "Router",
    "train_router",
    "format_report",
    "general_prompts",
    "GENERAL",
    "BASE_THRESHOLD",
    "featurize",
    "pooled_hidden_states",
    "read_labelled_jsonl",
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "WEIGHTINGS",
    "DEFAULT_P",
]
