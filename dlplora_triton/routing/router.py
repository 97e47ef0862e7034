"""The sentence router (DLP-LoRA's mini-MLP): inference, abstention, ``route``, save / load.

Text features come from :mod:`.features`, training from :mod:`.train`; how the router works, how it
says "none of these" (background classes) and why its probabilities are identical in any process is
in docs/routing.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..defaults import BASE_THRESHOLD, DEFAULT_P
from ..route_options import check_route_options
from . import train as _train
from . import update as _update
from .features import featurize, pooled_hidden_states
from .files import load_router, save_router
from .net import RouterNet, check_number, check_texts, net_inputs, one_thread, resolve_adapters
from .top_p import top_p_unchecked

__all__ = ["Router", "train_router"]


class Router:
    """DLP-LoRA's sentence router: text features -> mini-MLP -> task probabilities, or "none of these".

    Build one with :meth:`Router.train` or :meth:`Router.load`. The net scores ``classes`` (every label
    it was trained on); ``adapter_of`` maps each class to the adapter that serves it, or to ``None``
    (a *background* class: texts of tasks without an adapter, general prompts). ``names`` are the
    adapter names (sorted), the column order of :meth:`predict_proba`; ``background`` the classes
    mapped to ``None``. A text whose background probability (:meth:`base_proba`) is at least
    ``base_threshold`` is served by the base model: :meth:`route` gives it ``[]``. ``report`` holds the
    training report; ``net`` is the ``nn.Module``.

    ``Router(classes, features, mlp, adapters=None)`` builds an untrained router; ``adapters`` as in
    :meth:`with_adapters` (``None``: every class except ``GENERAL`` is its own adapter).
    """

    def __init__(
        self,
        classes: list[str],
        features: dict,
        mlp: dict,
        report: dict | None = None,
        encoder=None,
        adapters=None,
        base_threshold: float = BASE_THRESHOLD,
        net: nn.Module | None = None,
    ):
        self.classes = list(classes)
        self.adapter_of = resolve_adapters(self.classes, adapters)
        self.names = sorted({a for a in self.adapter_of.values() if a is not None})
        self.background = [c for c in self.classes if self.adapter_of[c] is None]
        check_number("base_threshold", base_threshold, 0, 1, low_open=True)
        self.base_threshold = float(base_threshold)
        self.features = dict(features)
        self.mlp_config = dict(mlp)
        self.report = report or {}
        self._encoder = encoder  # (model, tokenizer) for features="model"
        # {"indices", "offsets" | "vectors", "labels"}: a sample of the training texts as the net's
        # inputs, which add_task replays (routing/update.py); None for a router saved without one
        self.replay: dict | None = None
        if net is None:
            net = RouterNet(
                len(self.classes), list(mlp["hidden"]), mlp["dropout"], **net_inputs(self.features)
            )
        self.net = net
        self.net.eval()
        # per adapter (names order) the classes it serves, and the background classes: net columns
        self._groups = [
            [c for c, n in enumerate(self.classes) if self.adapter_of[n] == a] for a in self.names
        ]
        self._one_class_each = all(len(g) == 1 for g in self._groups)
        self._background_ids = [c for c, n in enumerate(self.classes) if self.adapter_of[n] is None]
        # as index tensors, made once: indexing with a list builds one on every call
        self._adapter_columns = torch.tensor([g[0] for g in self._groups], dtype=torch.int64)
        self._background_columns = torch.tensor(self._background_ids, dtype=torch.int64)

    @property
    def source(self) -> str:
        """``"hash"`` (hashed n-grams, self-contained) or ``"model"`` (a transformers model's hidden states)."""
        return self.features.get("source", "hash")

    @property
    def num_parameters(self) -> int:
        """Parameters of the router itself (not of the transformers model it may read)."""
        return sum(t.numel() for t in self.net.parameters())

    @property
    def can_abstain(self) -> bool:
        """Whether the router has a background class, i.e. can send a text to the base model by itself."""
        return bool(self.background)

    def with_adapters(self, adapters, base_threshold: float | None = None) -> Router:
        """The same trained router serving another set of adapters: the classes not served become
        background (their texts go to the base model). Shares the net (no copy, no retraining).

        ``adapters``: a list of class names (each class its own adapter; the other classes become
        background), or a dict ``{class: adapter name or None}`` (several classes may map to one
        adapter; classes not in it become background). ``GENERAL`` is always background.
        ``base_threshold``: default the router's. The training report is kept, less its ``served``
        figures (they were measured for the training-time adapters).

        Example: a router trained on 9 tasks feeding the 6 adapters a server has::

            >>> router.with_adapters(["code", "de", "fr", "ja", "ru", "zh"]).background
            ['_general', 'es', 'license', 'shell']
        """
        report = {k: v for k, v in self.report.items() if k != "served"}
        routed = type(self)(
            self.classes,
            self.features,
            self.mlp_config,
            report=report,
            encoder=self._encoder,
            adapters=adapters,
            base_threshold=self.base_threshold if base_threshold is None else base_threshold,
            net=self.net,
        )
        routed.replay = self.replay
        return routed

    def add_task(self, name: str, texts: Sequence[str], adapter: str | None = "", **options) -> Router:
        """A new router that also routes task ``name``, learnt from example ``texts`` in seconds, to
        ``adapter`` (default: the adapter named ``name``; None: the base model); this one is unchanged.
        Options (``method="full"``, ``"head"`` or ``"row"``, ``seed``, ...) and what it fits:
        :func:`dlplora_triton.routing.update.add_task`; accuracy against retraining: docs/routing.md."""
        return _update.add_task(self, name, texts, adapter, **options)

    def without_adapter(self, adapter: str) -> Router | None:
        """The router with ``adapter``'s classes made background (None when it was the last adapter)."""
        return _update.without_adapter(self, adapter)

    # ---- inference -------------------------------------------------------------------------------

    def _inputs(self, texts: list[str]) -> tuple[torch.Tensor, ...]:
        """The net's inputs for a list of texts (hashed features, or pooled hidden states)."""
        if self.source == "hash":
            return featurize(texts, self.features)
        model, tokenizer = self._encoder
        vectors = pooled_hidden_states(texts, model, tokenizer, self.features["max_length"])
        if vectors.shape[1] != self.features["hidden_size"]:
            raise ValueError(
                f"the model gives hidden states of size {vectors.shape[1]}; this router was trained on "
                f"size {self.features['hidden_size']} ({self.features.get('model_name') or 'unnamed model'})"
            )
        return (vectors,)

    @torch.no_grad()
    def class_logits(self, texts: Sequence[str], batch_size: int = 4096) -> torch.Tensor:
        """The net's logits ``[B, len(classes)]`` float32 of a list of ``B`` texts."""
        texts = check_texts(texts)
        check_number("batch_size", batch_size, 1, 2**62, integer=True)
        if self.net.training:  # eval() walks every module: a tenth of a one-prompt route
            self.net.eval()
        out = [torch.empty(0, len(self.classes))]
        for start in range(0, len(texts), batch_size):
            inputs = self._inputs(texts[start : start + batch_size])
            with one_thread():
                out.append(self.net(*inputs).float())
        return torch.cat(out)

    def _adapter_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, len(names)]``: P(adapter | not background), a softmax over each adapter's classes'
        log-sum-exp (in log space: no 0 / 0 when the background holds nearly all the mass)."""
        if self._one_class_each:
            grouped = logits.index_select(1, self._adapter_columns)
        else:
            grouped = torch.stack([torch.logsumexp(logits[:, g], dim=1) for g in self._groups], dim=1)
        return torch.softmax(grouped, dim=1)

    def _base_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]``: the probability of the background classes together (0 without background)."""
        if not self._background_ids:
            return torch.zeros(logits.shape[0])
        log_base = torch.logsumexp(logits.index_select(1, self._background_columns), dim=1)
        return torch.exp(log_base - torch.logsumexp(logits, dim=1))

    def predict_proba(self, texts: Sequence[str], batch_size: int = 4096) -> torch.Tensor:
        """Adapter probabilities ``[B, len(names)]`` float32 (rows sum to 1) of a list of ``B`` texts,
        given that an adapter serves the text: the background classes are left out and the rest
        renormalised. Whether the base model serves it instead: :meth:`base_proba`."""
        logits = self.class_logits(texts, batch_size)
        with one_thread():
            return self._adapter_probs(logits)

    def base_proba(self, texts: Sequence[str], batch_size: int = 4096) -> torch.Tensor:
        """``[B]`` float32: the probability that none of the adapters fits a text (the background
        classes' total); all 0 for a router without background (``can_abstain`` False)."""
        logits = self.class_logits(texts, batch_size)
        with one_thread():
            return self._base_probs(logits)

    def _check_route_args(self, p, top_k, weighting, min_confidence, base_threshold) -> float:
        options = check_route_options(
            p=p,
            top_k=top_k,
            weighting=weighting,
            min_confidence=min_confidence,
            base_threshold=base_threshold,
        )
        return self.base_threshold if options.base_threshold is None else options.base_threshold

    def route_tensors(
        self,
        texts: Sequence[str],
        p: float = DEFAULT_P,
        top_k: int | None = None,
        weighting: str = "renorm",
        min_confidence: float | None = None,
        base_threshold: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`route` as selection tensors: ``(ids [B, P] int64, weights [B, P] float32)``, ids into
        ``names``; a text served by the base model gets a row of ``-1`` ids and ``0`` weights (what
        ``fused_lora`` and ``MultiLoRA.select`` read as the base model). ``P`` >= 1 for ``B`` >= 1."""
        threshold = self._check_route_args(p, top_k, weighting, min_confidence, base_threshold)
        logits = self.class_logits(texts)
        if logits.shape[0] == 0:
            empty = torch.empty(0, 0)
            return empty.long(), empty.float()
        with one_thread():
            probs = self._adapter_probs(logits)
            # probs is a softmax: the row checks of top_p_select hold by construction
            ids, weights = top_p_unchecked(probs.double(), p, top_k, weighting)
            base = self._base_probs(logits) >= threshold
            if min_confidence is not None:
                base |= probs.max(dim=1).values < min_confidence
            ids = ids.masked_fill(base.unsqueeze(1), -1)
            weights = weights.masked_fill(base.unsqueeze(1), 0.0)
        return ids, weights

    def route(
        self,
        texts: Sequence[str],
        p: float = DEFAULT_P,
        top_k: int | None = None,
        weighting: str = "renorm",
        min_confidence: float | None = None,
        base_threshold: float | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Per text, the chosen ``[(adapter name, weight), ...]`` in descending probability, or ``[]``
        when the base model serves it. The result feeds ``MultiLoRA.select``.

        A text gets ``[]`` when its background probability (:meth:`base_proba`) is at least
        ``base_threshold`` (default: the router's, 0.3 unless set at training), or when its top
        adapter probability is below ``min_confidence`` (default: no such test). Otherwise its mix is
        exactly :func:`top_p_select` of :meth:`predict_proba` with ``p``, ``top_k``, ``weighting``.

        Example::

            >>> router.route(["Die Datei wird nicht gelöscht.", "def f(x): return x", "hello"], p=0.6)
            [[('de', 1.0)], [('code', 1.0)], []]
        """
        ids, weights = self.route_tensors(texts, p, top_k, weighting, min_confidence, base_threshold)
        return [
            [(self.names[i], w) for i, w in zip(row_ids, row_w) if i >= 0]
            for row_ids, row_w in zip(ids.tolist(), weights.tolist())
        ]

    # ---- training --------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Sequence[str], tasks: Sequence[str], **options) -> Router:
        """Train a router on labelled texts (lists of str of equal length, at least two distinct tasks);
        ``options`` and their defaults: :func:`dlplora_triton.routing.train.train_router`."""
        return _train.train_router(texts, tasks, router_cls=cls, **options)

    # ---- save / load -----------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``router_config.json`` (classes, adapters, base threshold, feature settings, format
        version, report) and ``router.safetensors`` (the weights) into ``directory`` (created if
        missing). A router on ``features="model"`` saves only itself: load it with the same model and
        tokenizer."""
        return save_router(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, model=None, tokenizer=None) -> Router:
        """Load a router written by :meth:`save` (``model`` and ``tokenizer``: only for a router trained
        on ``features="model"``). A missing directory or file raises ``FileNotFoundError``; a path that
        is a file, a corrupt or inconsistent file, another format version or a missing model raises
        ``ValueError`` naming the file; all before anything is built. A format_version 1 router (saved
        before abstention) loads as one without background (``can_abstain`` False): :meth:`with_adapters`
        can give it one."""
        return load_router(cls, directory, model, tokenizer)

    def __repr__(self) -> str:
        f = self.features
        inputs = (
            f"buckets={f['num_buckets']}x{f['embed_dim']}"
            if self.source == "hash"
            else f"hidden_size={f['hidden_size']}"
        )
        return (
            f"Router(names={self.names}, background={self.background}, base_threshold={self.base_threshold}, "
            f"{inputs}, hidden={self.mlp_config['hidden']}, parameters={self.num_parameters:,})"
        )


def train_router(texts: Sequence[str], tasks: Sequence[str], **options) -> Router:
    """Train a router on labelled texts: ``Router.train`` (``router_cls=`` another class to build, default
    :class:`Router`; the other options: :func:`dlplora_triton.routing.train.train_router`)."""
    cls = options.pop("router_cls", Router)
    return _train.train_router(texts, tasks, router_cls=cls, **options)
