"""The sentence router (DLP-LoRA's mini-MLP): inference, abstention, ``route``, save / load.

Text features come from :mod:`.features`, training from :mod:`.train`; how the router works, how it
says "none of these" (background classes) and why its probabilities are identical in any process is
in docs/routing.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..defaults import BASE_THRESHOLD, DEFAULT_P
from ..readers import read_json_object, read_safetensors
from ..route_options import check_route_options
from .features import featurize, pooled_hidden_states
from .select import top_p_select

__all__ = ["Router", "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE", "GENERAL", "BASE_THRESHOLD"]

FORMAT_VERSION = 2  # 2: classes, adapter_of, base_threshold (abstention); 1 is still read
GENERAL = "_general"  # the class of the general prompts Router.train adds; always background
CONFIG_FILE = "router_config.json"
WEIGHTS_FILE = "router.safetensors"
_FORMAT_NAME = "dlplora-router"


class _RouterNet(nn.Module):
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
        """The ``state_dict`` shapes of ``_RouterNet(num_tasks, hidden, dropout, **inputs)``, built from
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
        x = self.embedding(*inputs) if self.embedding is not None else inputs[0]
        return self.mlp(self.norm(x))


@contextlib.contextmanager
def _one_thread():
    """Run the router's tensor ops on one intra-op thread, restoring the caller's setting afterwards:
    faster on a busy CPU, and a fixed reduction order (docs/routing.md, "Identical probabilities")."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_texts(texts, what: str = "texts") -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{what}[{i}] is empty or blank; every text needs at least one character")
    return texts


def _check_number(
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
        self.adapter_of = _resolve_adapters(self.classes, adapters)
        self.names = sorted({a for a in self.adapter_of.values() if a is not None})
        self.background = [c for c in self.classes if self.adapter_of[c] is None]
        _check_number("base_threshold", base_threshold, 0, 1, low_open=True)
        self.base_threshold = float(base_threshold)
        self.features = dict(features)
        self.mlp_config = dict(mlp)
        self.report = report or {}
        self._encoder = encoder  # (model, tokenizer) for features="model"
        if net is None:
            net = _RouterNet(
                len(self.classes), list(mlp["hidden"]), mlp["dropout"], **_net_inputs(self.features)
            )
        self.net = net
        self.net.eval()
        # per adapter (names order) the classes it serves, and the background classes: net columns
        self._groups = [
            [c for c, n in enumerate(self.classes) if self.adapter_of[n] == a] for a in self.names
        ]
        self._one_class_each = all(len(g) == 1 for g in self._groups)
        self._background_ids = [c for c, n in enumerate(self.classes) if self.adapter_of[n] is None]

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
        return type(self)(
            self.classes,
            self.features,
            self.mlp_config,
            report=report,
            encoder=self._encoder,
            adapters=adapters,
            base_threshold=self.base_threshold if base_threshold is None else base_threshold,
            net=self.net,
        )

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
        texts = _check_texts(texts)
        _check_number("batch_size", batch_size, 1, 2**62, integer=True)
        self.net.eval()
        out = [torch.empty(0, len(self.classes))]
        for start in range(0, len(texts), batch_size):
            inputs = self._inputs(texts[start : start + batch_size])
            with _one_thread():
                out.append(self.net(*inputs).float())
        return torch.cat(out)

    def _adapter_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, len(names)]``: P(adapter | not background), a softmax over each adapter's classes'
        log-sum-exp (in log space: no 0 / 0 when the background holds nearly all the mass)."""
        with _one_thread():
            if self._one_class_each:
                grouped = logits[:, [g[0] for g in self._groups]]
            else:
                grouped = torch.stack([torch.logsumexp(logits[:, g], dim=1) for g in self._groups], dim=1)
            return torch.softmax(grouped, dim=1)

    def _base_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]``: the probability of the background classes together (0 without background)."""
        if not self._background_ids:
            return torch.zeros(logits.shape[0])
        with _one_thread():
            log_base = torch.logsumexp(logits[:, self._background_ids], dim=1)
            return torch.exp(log_base - torch.logsumexp(logits, dim=1))

    def predict_proba(self, texts: Sequence[str], batch_size: int = 4096) -> torch.Tensor:
        """Adapter probabilities ``[B, len(names)]`` float32 (rows sum to 1) of a list of ``B`` texts,
        given that an adapter serves the text: the background classes are left out and the rest
        renormalised. Whether the base model serves it instead: :meth:`base_proba`."""
        return self._adapter_probs(self.class_logits(texts, batch_size))

    def base_proba(self, texts: Sequence[str], batch_size: int = 4096) -> torch.Tensor:
        """``[B]`` float32: the probability that none of the adapters fits a text (the background
        classes' total); all 0 for a router without background (``can_abstain`` False)."""
        return self._base_probs(self.class_logits(texts, batch_size))

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
        """:meth:`route` as routing tensors: ``(ids [B, P] int64, weights [B, P] float32)``, ids into
        ``names``; a text served by the base model gets a row of ``-1`` ids and ``0`` weights (what
        ``fused_lora`` and ``MultiLoRA.select`` read as the base model). ``P`` >= 1 for ``B`` >= 1."""
        threshold = self._check_route_args(p, top_k, weighting, min_confidence, base_threshold)
        logits = self.class_logits(texts)
        probs = self._adapter_probs(logits)
        if probs.shape[0] == 0:
            empty = torch.empty(0, 0)
            return empty.long(), empty.float()
        ids, weights = top_p_select(probs, p=p, top_k=top_k, weighting=weighting)
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
        from .train import train_router

        return train_router(texts, tasks, router_cls=cls, **options)

    # ---- save / load -----------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``router_config.json`` (classes, adapters, base threshold, feature settings, format
        version, report) and ``router.safetensors`` (the weights) into ``directory`` (created if
        missing). A router on ``features="model"`` saves only itself: load it with the same model and
        tokenizer."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(
                f"cannot save the router to {str(directory)!r}: it exists and is not a directory"
            )
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "format": _FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "names": self.names,
            "classes": self.classes,
            "adapter_of": self.adapter_of,
            "base_threshold": self.base_threshold,
            "features": self.features,
            "mlp": self.mlp_config,
            "report": self.report,
        }
        # Write next to the target, then rename: a crash never leaves a half-written file behind.
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()},
            str(tmp),
            metadata={"format": _FORMAT_NAME},
        )
        os.replace(tmp, directory / WEIGHTS_FILE)
        tmp = directory / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, directory / CONFIG_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model=None, tokenizer=None) -> Router:
        """Load a router written by :meth:`save` (``model`` and ``tokenizer``: only for a router trained
        on ``features="model"``). A missing directory or file raises ``FileNotFoundError``; a path that
        is a file, a corrupt or inconsistent file, another format version or a missing model raises
        ``ValueError`` naming the file; all before anything is built. A format_version 1 router (saved
        before abstention) loads as one without background (``can_abstain`` False): :meth:`with_adapters`
        can give it one."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(
                f"router {str(directory)!r} is a file; a saved router is a folder holding {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} (what train-router --out and Router.save write)"
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"router directory {str(directory)!r} does not exist")
        owner = f"router at {str(directory)!r}"
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{str(path)!r} not found: {directory} is not a saved router")
        classes, adapter_of, threshold, features, mlp, report = _parse_config(
            read_json_object(config_path, owner), config_path
        )
        encoder = None
        if features["source"] == "model":
            if model is None or tokenizer is None:
                raise ValueError(
                    f"{directory} routes on the hidden states of a transformers model "
                    f"({features.get('model_name') or 'unnamed'}): pass model= and tokenizer= to Router.load"
                )
            encoder = (model, tokenizer)
        state = read_safetensors(weights_path, owner)
        expected = _RouterNet.state_shapes(len(classes), mlp["hidden"], _net_inputs(features))
        got = {k: list(v.shape) for k, v in state.items()}
        if got != expected:
            wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            raise ValueError(
                f"{owner}: {weights_path} does not match {config_path} ({len(classes)} classes, features and mlp): "
                + ", ".join(f"{k}: file {got.get(k)}, config {expected.get(k)}" for k in wrong[:4])
            )
        for key, tensor in state.items():
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValueError(f"{owner}: {weights_path}: tensor {key!r} is not finite floating point")
        with torch.random.fork_rng(
            devices=[]
        ):  # building the net draws initial weights: not the caller's RNG
            router = cls(
                classes,
                features,
                mlp,
                report=report,
                encoder=encoder,
                adapters=adapter_of,
                base_threshold=threshold,
            )
        router.net.load_state_dict(state)
        return router

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


def _net_inputs(features: dict) -> dict:
    """The :class:`_RouterNet` input arguments of a feature config."""
    if features.get("source", "hash") == "hash":
        return {"num_buckets": features["num_buckets"], "embed_dim": features["embed_dim"]}
    return {"input_dim": features["hidden_size"]}


def _resolve_adapters(classes: list[str], adapters) -> dict[str, str | None]:
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


def _parse_config(config: dict, path: Path) -> tuple[list[str], dict, float, dict, dict, dict]:
    """``(classes, adapter_of, base_threshold, features, mlp, report)`` of a saved router's config,
    every field checked. Format version 1 (no background) is read as every name its own adapter."""
    where = f"router config {str(path)!r}"
    if config.get("format") != _FORMAT_NAME:
        raise ValueError(f"{where} is not a dlplora router config (no 'format': '{_FORMAT_NAME}')")
    version = config.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ValueError(
            f"{where} has format_version {version!r}; this version of "
            f"dlplora_triton reads format_version 1 and {FORMAT_VERSION}"
        )

    def fail(field: str, value, expected: str):
        raise ValueError(f"{where} is missing or has a malformed field: {field} = {value!r} ({expected})")

    names = config.get("names")
    if (
        not isinstance(names, list)
        or len(names) < (2 if version == 1 else 1)
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        fail("names", names, "distinct non-empty adapter names, at least two in format_version 1")
    if version == 1:
        classes, adapter_of, threshold = names, {n: n for n in names}, BASE_THRESHOLD
    else:
        classes, adapter_of, threshold = (
            config.get("classes"),
            config.get("adapter_of"),
            config.get("base_threshold"),
        )
        if (
            not isinstance(classes, list)
            or len(classes) < 2
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)
        ):
            fail("classes", classes, "at least two distinct non-empty class names")
        if not (
            isinstance(adapter_of, dict)
            and set(adapter_of) == set(classes)
            and all(a is None or (isinstance(a, str) and a) for a in adapter_of.values())
        ):
            fail("adapter_of", adapter_of, "an object mapping every class to an adapter name or null")
        if adapter_of.get(GENERAL) is not None:
            fail("adapter_of", adapter_of, f"{GENERAL!r} must map to null")
        if sorted({a for a in adapter_of.values() if a is not None}) != sorted(names):
            fail("names", names, "the adapter names of adapter_of, sorted")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or not 0 < threshold <= 1
        ):
            fail("base_threshold", threshold, "a number in (0, 1]")
    features, mlp, report = config.get("features"), config.get("mlp"), config.get("report") or {}
    if not isinstance(features, dict):
        fail("features", features, "an object")
    features = dict(features)
    features.setdefault("source", "hash")
    if features["source"] == "hash":
        ints = {"num_buckets": 1, "embed_dim": 1, "word_ngrams": 0, "max_chars": 1}
        char = features.get("char_ngrams")
        if not (
            isinstance(char, list)
            and len(char) == 2
            and all(_is_int(c) for c in char)
            and 1 <= char[0] <= char[1]
        ):
            fail("features.char_ngrams", char, "[min, max] with 1 <= min <= max")
    elif features["source"] == "model":
        ints = {"hidden_size": 1, "max_length": 1}
    else:
        fail("features.source", features["source"], "'hash' or 'model'")
    for key, low in ints.items():
        if not (_is_int(features.get(key)) and features[key] >= low):
            fail(f"features.{key}", features.get(key), f"an integer >= {low}")
    if not isinstance(mlp, dict):
        fail("mlp", mlp, "an object")
    hidden, dropout = mlp.get("hidden"), mlp.get("dropout")
    if not (isinstance(hidden, list) and all(_is_int(h) and h >= 1 for h in hidden)):
        fail("mlp.hidden", hidden, "a list of positive integers")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        fail("mlp.dropout", dropout, "a number in [0, 1)")
    if not isinstance(report, dict):
        fail("report", report, "an object")
    return (
        classes,
        adapter_of,
        float(threshold),
        features,
        {"hidden": hidden, "dropout": float(dropout)},
        report,
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
