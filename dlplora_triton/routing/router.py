"""The sentence router (DLP-LoRA's mini-MLP): inference, ``route``, save / load.

Text features come from :mod:`.features`, training from :mod:`.train`; how the router works and why
its probabilities are identical in any process is in docs/routing.md.
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

from ..readers import read_json_object, read_safetensors
from .features import featurize, pooled_hidden_states
from .select import _check_p, _check_top_k, _check_weighting, top_p_select

__all__ = ["Router", "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE"]

FORMAT_VERSION = 1
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
    """DLP-LoRA's sentence router: text features -> mini-MLP -> task probabilities.

    Build one with :meth:`Router.train` or :meth:`Router.load`. ``names`` are the task names (sorted),
    the column order of :meth:`predict_proba`; ``report`` holds the training report (held-out accuracy,
    per-task accuracy, the most confused pairs, timings); ``net`` is the ``nn.Module``.
    """

    def __init__(self, names: list[str], features: dict, mlp: dict, report: dict | None = None, encoder=None):
        self.names = list(names)
        self.features = dict(features)
        self.mlp_config = dict(mlp)
        self.report = report or {}
        self._encoder = encoder  # (model, tokenizer) for features="model"
        self.net = _RouterNet(
            len(self.names), list(mlp["hidden"]), mlp["dropout"], **_net_inputs(self.features)
        )
        self.net.eval()

    @property
    def source(self) -> str:
        """``"hash"`` (hashed n-grams, self-contained) or ``"model"`` (a transformers model's hidden states)."""
        return self.features.get("source", "hash")

    @property
    def num_parameters(self) -> int:
        """Parameters of the router itself (not of the transformers model it may read)."""
        return sum(t.numel() for t in self.net.parameters())

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
    def predict_proba(self, texts: Sequence[str], batch_size: int = 4096) -> torch.Tensor:
        """Task probabilities ``[B, len(names)]`` float32 (rows sum to 1) of a list of ``B`` texts."""
        texts = _check_texts(texts)
        _check_number("batch_size", batch_size, 1, 2**62, integer=True)
        self.net.eval()
        out = [torch.empty(0, len(self.names))]
        for start in range(0, len(texts), batch_size):
            inputs = self._inputs(texts[start : start + batch_size])
            with _one_thread():
                out.append(torch.softmax(self.net(*inputs).float(), dim=1))
        return torch.cat(out)

    def route(
        self,
        texts: Sequence[str],
        p: float = 0.6,
        top_k: int | None = None,
        weighting: str = "renorm",
        min_confidence: float | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Per text, the chosen ``[(task name, weight), ...]`` in descending probability: exactly
        :func:`top_p_select` of :meth:`predict_proba`. A text whose top probability is below
        ``min_confidence`` gets ``[]`` (the base model). The result feeds ``MultiLoRA.select``.

        Example::

            >>> router.route(["Wie lösche ich einen Benutzer?", "def f(x): return x"], p=0.6)
            [[('de', 1.0)], [('code', 1.0)]]
        """
        _check_p(p), _check_top_k(top_k), _check_weighting(weighting)
        if min_confidence is not None:
            _check_number("min_confidence", min_confidence, 0, 1)
        probs = self.predict_proba(texts)
        if probs.shape[0] == 0:
            return []
        ids, weights = top_p_select(probs, p=p, top_k=top_k, weighting=weighting)
        confident = probs.max(dim=1).values >= (min_confidence or 0.0)
        return [
            [(self.names[i], w) for i, w in zip(row_ids, row_w) if i >= 0] if ok else []
            for row_ids, row_w, ok in zip(ids.tolist(), weights.tolist(), confident.tolist())
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
        """Write ``router_config.json`` (names, feature settings, format version, report) and
        ``router.safetensors`` (the weights) into ``directory`` (created if missing). A router on
        ``features="model"`` saves only itself: load it with the same model and tokenizer."""
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
        on ``features="model"``). A missing directory or file raises ``FileNotFoundError``; a corrupt or
        inconsistent file, another format version or a missing model raises ``ValueError`` naming the
        file; both before anything is built."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"router directory {str(directory)!r} does not exist")
        owner = f"router at {str(directory)!r}"
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{str(path)!r} not found: {directory} is not a saved router")
        names, features, mlp, report = _parse_config(read_json_object(config_path, owner), config_path)
        encoder = None
        if features["source"] == "model":
            if model is None or tokenizer is None:
                raise ValueError(
                    f"{directory} routes on the hidden states of a transformers model "
                    f"({features.get('model_name') or 'unnamed'}): pass model= and tokenizer= to Router.load"
                )
            encoder = (model, tokenizer)
        state = read_safetensors(weights_path, owner)
        expected = _RouterNet.state_shapes(len(names), mlp["hidden"], _net_inputs(features))
        got = {k: list(v.shape) for k, v in state.items()}
        if got != expected:
            wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            raise ValueError(
                f"{owner}: {weights_path} does not match {config_path} ({len(names)} names, features and mlp): "
                + ", ".join(f"{k}: file {got.get(k)}, config {expected.get(k)}" for k in wrong[:4])
            )
        for key, tensor in state.items():
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValueError(f"{owner}: {weights_path}: tensor {key!r} is not finite floating point")
        with torch.random.fork_rng(
            devices=[]
        ):  # building the net draws initial weights: not the caller's RNG
            router = cls(names, features, mlp, report=report, encoder=encoder)
        router.net.load_state_dict(state)
        return router

    def __repr__(self) -> str:
        f = self.features
        inputs = (
            f"buckets={f['num_buckets']}x{f['embed_dim']}"
            if self.source == "hash"
            else f"hidden_size={f['hidden_size']}"
        )
        return f"Router(names={self.names}, {inputs}, hidden={self.mlp_config['hidden']}, parameters={self.num_parameters:,})"


def _net_inputs(features: dict) -> dict:
    """The :class:`_RouterNet` input arguments of a feature config."""
    if features.get("source", "hash") == "hash":
        return {"num_buckets": features["num_buckets"], "embed_dim": features["embed_dim"]}
    return {"input_dim": features["hidden_size"]}


def _parse_config(config: dict, path: Path) -> tuple[list[str], dict, dict, dict]:
    """``(names, features, mlp, report)`` of a saved router's config, every field checked."""
    where = f"router config {str(path)!r}"
    if config.get("format") != _FORMAT_NAME:
        raise ValueError(f"{where} is not a dlplora router config (no 'format': '{_FORMAT_NAME}')")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version {config.get('format_version')!r}; this version of "
            f"dlplora_triton reads format_version {FORMAT_VERSION}"
        )

    def fail(field: str, value, expected: str):
        raise ValueError(f"{where} is missing or has a malformed field: {field} = {value!r} ({expected})")

    names = config.get("names")
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        fail("names", names, "at least two distinct non-empty task names")
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
    return names, features, {"hidden": hidden, "dropout": float(dropout)}, report


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
