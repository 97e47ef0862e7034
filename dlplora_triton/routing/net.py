"""What the sentence router, its training and its files share: the net, its classes, the checks.

- :class:`RouterNet`: the mini-MLP (hashed-feature bag or pooled hidden states -> class logits), and
  :func:`net_inputs`, its arguments for a feature config;
- :data:`GENERAL`, :data:`BASE_THRESHOLD` and :func:`resolve_adapters`: the classes the net scores and
  the adapters (or the base model: background) that serve them;
- :func:`one_thread`: the one intra-op thread every router tensor op runs on;
- :func:`check_texts`, :func:`check_number`: argument checks with errors that name the argument.

:mod:`.router` (the :class:`~dlplora_triton.routing.Router`), :mod:`.train` and :mod:`.files` import
this module; it imports none of them. docs/routing.md says how the router works.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..defaults import (
    BASE_THRESHOLD,  # the base model serves a text whose background probability is at least this
)

__all__ = [
    "RouterNet",
    "net_inputs",
    "GENERAL",
    "BASE_THRESHOLD",
    "resolve_adapters",
    "one_thread",
    "check_texts",
    "check_number",
    "gather_bags",
    "weighted_loss",
]

GENERAL = "_general"  # the class of the general prompts Router.train adds; always background


class RouterNet(nn.Module):
    """Text vector -> LayerNorm -> [Linear -> GELU -> Dropout] * len(hidden) -> Linear to task logits.

    The text vector is the mean of the text's hashed-feature rows (an ``nn.EmbeddingBag`` of
    ``num_buckets x embed_dim``), or, with ``input_dim``, a vector given as input (pooled hidden states).
    """

    def __init__(
        self,
        num_tasks: int,
        hidden: list[int],
        dropout: float,
        num_buckets: int | None = None,
        embed_dim: int | None = None,
        input_dim: int | None = None,
    ):
        super().__init__()
        if num_buckets is not None:
            self.embedding = nn.EmbeddingBag(num_buckets, embed_dim, mode="mean")
            # Small initial rows (fastText-style), not nn.Embedding's N(0, 1): a text's vector is the mean
            # of its rows, and with unit-variance rows the random part of rare and unseen n-grams drowns
            # what training learns (held-out accuracy 85% instead of 99% on the bench set).
            nn.init.normal_(self.embedding.weight, std=0.01)
            width = embed_dim
        else:
            self.embedding = None
            width = input_dim
        self.norm = nn.LayerNorm(width)
        layers = []
        for size in hidden:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_tasks))
        self.mlp = nn.Sequential(*layers)

    @staticmethod
    def state_shapes(num_tasks: int, hidden: list[int], inputs: dict) -> dict[str, list[int]]:
        """The ``state_dict`` shapes of ``RouterNet(num_tasks, hidden, dropout, **inputs)``, built from
        the arguments alone (so a saved router is checked before any tensor is allocated)."""
        shapes = {}
        if inputs.get("num_buckets") is not None:
            shapes["embedding.weight"] = [inputs["num_buckets"], inputs["embed_dim"]]
            width = inputs["embed_dim"]
        else:
            width = inputs["input_dim"]
        shapes["norm.weight"] = shapes["norm.bias"] = [width]
        for i, size in enumerate([*hidden, num_tasks]):
            shapes[f"mlp.{3 * i}.weight"], shapes[f"mlp.{3 * i}.bias"] = [size, width], [size]
            width = size
        return shapes

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_tasks]``. Inputs: ``(indices [F], offsets [B])`` (text b's buckets are
        ``indices[offsets[b]:offsets[b+1]]``), or ``(vectors [B, input_dim],)``."""
        if self.training or torch.is_grad_enabled():
            x = self.embedding(*inputs) if self.embedding is not None else inputs[0]
            return self.mlp(self.norm(x))
        # Inference: the same ops without nn.Module's call machinery (a fifth of a one-prompt route's
        # time, on a CPU where a small op costs microseconds); dropout is the identity in eval.
        if self.embedding is not None:
            x = F.embedding_bag(inputs[0], self.embedding.weight, inputs[1], mode=self.embedding.mode)
        else:
            x = inputs[0]
        x = F.layer_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                x = F.linear(x, layer.weight, layer.bias)
            elif isinstance(layer, nn.GELU):
                x = F.gelu(x, approximate=layer.approximate)
            elif not isinstance(layer, nn.Dropout):
                x = layer(x)
        return x


def gather_bags(
    indices: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The EmbeddingBag inputs ``(indices, offsets)`` of the texts ``rows`` of a batch of bags (a
    vectorized slice gather)."""
    lens = torch.diff(offsets, append=torch.tensor([indices.numel()]))[rows]
    starts = offsets[rows]
    new_offsets = torch.cumsum(lens, 0) - lens
    flat = torch.repeat_interleave(starts - new_offsets, lens) + torch.arange(int(lens.sum()))
    return indices[flat], new_offsets


def net_inputs(features: dict) -> dict:
    """The :class:`RouterNet` input arguments of a feature config."""
    if features.get("source", "hash") == "hash":
        return {"num_buckets": features["num_buckets"], "embed_dim": features["embed_dim"]}
    return {"input_dim": features["hidden_size"]}


def resolve_adapters(classes: list[str], adapters) -> dict[str, str | None]:
    """``{class: adapter name or None}`` of ``adapters`` (None, a list of classes, or a dict), checked."""
    if (
        len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ValueError(f"a router needs at least two distinct non-empty class names, got {classes!r}")
    if adapters is None:
        mapping = {c: (None if c == GENERAL else c) for c in classes}
    elif isinstance(adapters, dict):
        unknown = sorted(str(k) for k in adapters if k not in classes)
        if unknown:
            raise ValueError(f"adapters maps {unknown}, which are not classes of this router: {classes}")
        for cls_name, name in adapters.items():
            if name is not None and not (isinstance(name, str) and name):
                raise ValueError(
                    f"adapters[{cls_name!r}] must be an adapter name (a non-empty str) or None, got {name!r}"
                )
        mapping = {c: adapters.get(c) for c in classes}
    elif isinstance(adapters, (list, tuple, set, frozenset)):
        unknown = sorted(str(a) for a in adapters if a not in classes)
        if unknown:
            raise ValueError(f"adapters {unknown} are not classes of this router: {classes}")
        mapping = {c: (c if c in adapters else None) for c in classes}
    else:
        raise TypeError(
            f"adapters must be None, a list of class names or a dict {{class: adapter or None}}, got {type(adapters).__name__}"
        )
    if mapping.get(GENERAL) is not None:
        raise ValueError(
            f"the class {GENERAL!r} (general prompts) is background; it cannot map to an adapter"
        )
    if all(a is None for a in mapping.values()):
        raise ValueError(f"adapters leaves no class served by an adapter (classes: {classes})")
    return mapping


@contextlib.contextmanager
def one_thread():
    """Run the router's tensor ops on one intra-op thread, restoring the caller's setting afterwards:
    faster on a busy CPU, and a fixed reduction order (docs/routing.md, "Identical probabilities")."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_texts(texts, what: str = "texts") -> list[str]:
    """``texts`` as a list, or TypeError / ValueError naming ``what``: a list of non-blank str."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{what}[{i}] is empty or blank; every text needs at least one character")
    return texts


def check_number(
    name: str,
    value,
    low: float,
    high: float,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ValueError naming ``name`` unless ``value`` is a (integer) number in the given interval."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int if integer else (int, float))
        and math.isfinite(value)
    )
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        kind, lo, hi = (
            "an integer" if integer else "a number",
            "(" if low_open else "[",
            ")" if high_open else "]",
        )
        raise ValueError(f"{name} must be {kind} in {lo}{low}, {high}{hi}, got {value!r}")


def weighted_loss(logits, targets, weight, label_smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy, each text weighted by its task's weight (None: unweighted).

    Not ``F.cross_entropy(weight=...)``: with label smoothing it also weights each class's share of
    the smoothing mass, so every text learns to put mass on the rare classes in proportion to their
    weight. With a few large adapter tasks and many small background tasks that mass is background:
    a clear German sentence got base_proba ~0.3 and went to the base model (docs/routing.md,
    "Unseen sources")."""
    per_text = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
    if weight is None:
        return per_text.mean()
    text_weight = weight[targets]
    return (per_text * text_weight).sum() / text_weight.sum()
