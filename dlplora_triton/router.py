"""The DLP-LoRA sentence router and the top-p adapter selection.

- :func:`top_p_select`: task probabilities ``[B, L]`` -> ``(adapter_ids, adapter_weights)`` ``[B, P]``, the
  routing tensors :func:`dlplora_triton.fused_lora` takes. Batched tensor code, no loop over rows.
- :class:`Router`: DLP-LoRA's "mini-MLP" (arXiv 2410.01497, about 5M parameters) over hashed text
  features that need nothing downloaded and work in any language or script: word unigrams and bigrams
  plus character 2-4-grams of the lower-cased text, mean-pooled by an ``nn.EmbeddingBag``, then a small
  MLP to task logits. ``Router.train`` fits it on labelled sentences (AdamW, stratified held-out split,
  early stopping, class-balanced loss, fixed seed); ``route`` returns, per text, the adapter mix that
  ``MultiLoRA.select`` takes. Optionally (``features="model"``) the MLP reads mean-pooled hidden states
  of a transformers model instead of hashed n-grams.

Feature hashing is a fixed function of the text (no Python ``hash()``, whose seed changes per process):
character n-grams are hashed with a polynomial hash over Unicode code points, computed for the whole
batch at once with numpy vector ops; words with ``zlib.crc32`` of their UTF-8 bytes. The router's tensor
ops run on one thread (see ``_one_thread``). A router saved and loaded again therefore gives identical
probabilities in any process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import unicodedata
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "top_p_select",
    "Router",
    "featurize",
    "pooled_hidden_states",
    "read_labelled_jsonl",
    "format_report",
    "FORMAT_VERSION",
    "WEIGHTINGS",
]

WEIGHTINGS = ("renorm", "softmax")
FORMAT_VERSION = 1
CONFIG_FILE = "router_config.json"
WEIGHTS_FILE = "router.safetensors"
_FORMAT_NAME = "dlplora-router"


# ---------------------------------------------------------------------------------------------------
# top-p selection


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
        raise ValueError(f"p must be a number in (0, 1], got {p!r}")
    return float(p)


def _check_top_k(top_k) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    return top_k


def _check_weighting(weighting) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return weighting


def top_p_select(
    probs: torch.Tensor, p: float = 0.6, top_k: int | None = None, weighting: str = "renorm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per row, the most likely adapters whose cumulative probability first reaches ``p``.

    Args:
        probs: ``[B, L]`` float tensor, non-negative, finite, each row summing to 1 (within
            ``1e-3 + L * eps(dtype)``; rows of raw scores or logits are rejected).
        p: in (0, 1]. In descending probability (ties: lower index first), adapter ``j`` is kept iff
            the probabilities ranked above it sum to < ``p``: the one that crosses ``p`` is kept, and
            so at least one. ``p = 1`` keeps every adapter of non-zero probability.
        top_k: optional cap on the number kept per row, applied after the top-p cut.
        weighting: ``"renorm"``: kept probabilities divided by their sum; ``"softmax"``: softmax over
            the kept probabilities (DLP-LoRA's published code).

    Returns ``(ids, weights)``: ``ids [B, P]`` int64, kept adapter indices in descending probability
    order, ``-1`` in empty slots; ``weights [B, P]`` float32, 0 in empty slots, each row summing to 1;
    ``P`` = the largest number kept in any row. A zero-probability adapter is never kept. The cut is
    computed in float64 of the given values: entries that sum exactly to ``p`` end the cut.

    Semantics::

        for b in range(B):
            order = stable_argsort(-probs[b]); above = 0; kept = []
            for j in order:
                if above >= p or probs[b, j] == 0 or len(kept) == top_k: break
                kept.append(j); above += probs[b, j]

    Example::

        >>> top_p_select(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.9, 0.0]]), p=0.6)
        (tensor([[ 0,  1], [ 1, -1]]), tensor([[0.6250, 0.3750], [1.0000, 0.0000]]))
    """
    p = _check_p(p)
    top_k = _check_top_k(top_k)
    weighting = _check_weighting(weighting)
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"probs must be a torch.Tensor of shape [B, L], got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating-point tensor, got {probs.dtype}")
    if probs.dim() != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must have shape [B, L] with L >= 1, got {list(probs.shape)}")
    batch, num = probs.shape
    if batch == 0:
        empty = torch.empty(0, 0, device=probs.device)
        return empty.long(), empty.float()
    p64 = probs.detach().double()
    if not torch.isfinite(p64).all():
        raise ValueError("probs must be finite, got NaN or infinity")
    if (p64 < 0).any():
        raise ValueError(f"probs must be non-negative, got a minimum of {p64.min().item():.4g}")
    sums = p64.sum(dim=1)
    tolerance = 1e-3 + num * torch.finfo(probs.dtype).eps
    bad = (sums - 1).abs() > tolerance
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"probs rows must sum to 1, row {row} sums to {sums[row].item():.6g}")

    # Stable descending sort: equal probabilities keep the lower adapter index first.
    sorted_p, order = torch.sort(p64, dim=1, descending=True, stable=True)
    # The mass ranked above each entry: an exclusive running sum (shifted, not cumsum - p, so that it is
    # exactly the sum of the entries above, added in order, and 0 for the first).
    above = torch.cat([torch.zeros_like(sorted_p[:, :1]), torch.cumsum(sorted_p, dim=1)[:, :-1]], dim=1)
    keep = (above < p) & (sorted_p > 0)
    if top_k is not None:
        keep &= torch.arange(num, device=probs.device) < top_k
    width = int(keep.sum(dim=1).max())  # keep is a prefix of each row, so its count is its width
    keep, order, sorted_p = keep[:, :width], order[:, :width], sorted_p[:, :width]
    ids = torch.where(keep, order, torch.full_like(order, -1))
    if weighting == "renorm":
        kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        weights = kept / kept.sum(dim=1, keepdim=True)
    else:
        weights = torch.softmax(torch.where(keep, sorted_p, torch.full_like(sorted_p, -math.inf)), dim=1)
    return ids, weights.float()


# ---------------------------------------------------------------------------------------------------
# feature hashing

_MOD = 2_147_483_647  # 2^31 - 1: a prime; h < 2^31 times a multiplier < 2^31 stays inside int64
_BASE = 1_000_003
_MIX = 1_597_334_677 % _MOD
_WORD = re.compile(r"\w+")


def _normalise(text: str, max_chars: int) -> str:
    # NFKC folds width variants (full-width Latin, half-width kana) and ligatures; casefold-lite via
    # lower(); whitespace collapsed so that layout does not change the features.
    text = unicodedata.normalize("NFKC", text[: 4 * max_chars]).lower()
    return " ".join(text.replace("\x00", " ").split())[:max_chars]


def _char_ngram_hashes(texts: list[str], ngram_min: int, ngram_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes (in [0, 2^31-1)) of the character n-grams of ``" " + text + " "``, and their text index.

    All texts are joined with NUL separators and hashed at once: for n-gram length n starting at i,
    ``h = poly(c[i], ..., c[i+n-1]) mod (2^31 - 1)`` over code points; windows that contain a separator
    are dropped, and the number of separators before i is the text index.
    """
    joined = "\x00".join(f" {t} " for t in texts)
    # surrogatepass: a lone surrogate (from surrogateescape decoding) is hashed as its code point.
    codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
    is_sep = codes == 0
    seps_upto = np.concatenate([[0], np.cumsum(is_sep)])  # separators in codes[:i]
    total = codes.size
    hashes, owners = [], []
    for n in range(ngram_min, ngram_max + 1):
        count = total - n + 1
        if count <= 0:
            continue
        h = np.full(count, n * 7919, dtype=np.int64)
        for k in range(n):
            h = (h * _BASE + codes[k : k + count] + 1) % _MOD
        valid = seps_upto[n : n + count] == seps_upto[:count]  # no separator inside the window
        hashes.append(h[valid])
        owners.append(seps_upto[:count][valid])
    empty = np.zeros(0, dtype=np.int64)
    return np.concatenate([empty, *hashes]), np.concatenate([empty, *owners])


def _word_hashes(texts: list[str], word_ngrams: int) -> tuple[np.ndarray, np.ndarray]:
    """crc32 hashes of word unigrams (.. up to ``word_ngrams``-grams) and their text index."""
    values, counts = [], []
    for text in texts:
        words = _WORD.findall(text)
        grams = ["w1\x01" + w for w in words]
        for n in range(2, word_ngrams + 1):
            grams += [f"w{n}\x01" + "\x02".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        values += [zlib.crc32(g.encode("utf-8", "surrogatepass")) for g in grams]
        counts.append(len(grams))
    owners = np.repeat(np.arange(len(texts), dtype=np.int64), counts)
    return np.asarray(values, dtype=np.int64), owners


def _avalanche(h: np.ndarray, num_buckets: int) -> np.ndarray:
    # Spread the hash bits before the modulo: polynomial hashes of nearby n-grams differ in low bits
    # in a structured way; one multiply-xorshift round mixes them (all values stay below 2^62).
    h = (h % _MOD) * _MIX % _MOD
    h = h ^ (h >> 13)
    return h % num_buckets


def featurize(texts: list[str], features: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket indices of all features of ``texts`` grouped by text, and the ``[B]`` offsets.

    ``features``: ``num_buckets``, ``char_ngrams`` ``[min, max]``, ``word_ngrams``, ``max_chars``.
    Returns ``(indices [F] int64, offsets [B] int64)`` for ``nn.EmbeddingBag``. Hashing runs in numpy:
    single-threaded vector ops, which on a busy CPU beat torch's thread pool on these small arrays.
    """
    norm = [_normalise(t, features["max_chars"]) for t in texts]
    lo, hi = features["char_ngrams"]
    char_h, char_owner = _char_ngram_hashes(norm, lo, hi)
    word_h, word_owner = _word_hashes(norm, features["word_ngrams"])
    # Salt the two families apart before bucketing, so a word and a character n-gram with equal raw
    # hashes do not share a bucket by construction.
    hashes = np.concatenate([char_h, word_h * 31 + 17])
    owner = np.concatenate([char_owner, word_owner])
    order = np.argsort(owner, kind="stable")
    indices = _avalanche(hashes[order], features["num_buckets"])
    counts = np.bincount(owner, minlength=len(texts))
    offsets = np.cumsum(counts) - counts
    return torch.from_numpy(indices), torch.from_numpy(offsets)


# ---------------------------------------------------------------------------------------------------
# the optional second feature source: pooled hidden states of a transformers model


@torch.no_grad()
def pooled_hidden_states(
    texts: list[str], model, tokenizer, max_length: int = 256, batch_size: int = 32
) -> torch.Tensor:
    """Mean of the last layer's hidden states over each text's tokens: ``[B, hidden_size]`` float32, CPU.

    Texts are right-padded (the tokenizer's padding side is restored afterwards), so that with a causal
    model no real token attends to padding and positions start at 0: a text's vector does not depend on
    the other texts of its batch. A tokenizer without a pad token pads with its eos token (masked out).
    """
    device = next(model.parameters()).device
    side, was_training, borrowed_pad = tokenizer.padding_side, model.training, tokenizer.pad_token is None
    if borrowed_pad:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            batch = tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            hidden = (
                model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
            )
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)).cpu())
    finally:
        tokenizer.padding_side = side
        if borrowed_pad:
            tokenizer.pad_token = None
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


# ---------------------------------------------------------------------------------------------------
# the network


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

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_tasks]``. Inputs: ``(indices [F], offsets [B])`` (text b's buckets are
        ``indices[offsets[b]:offsets[b+1]]``), or ``(vectors [B, input_dim],)``."""
        x = self.embedding(*inputs) if self.embedding is not None else inputs[0]
        return self.mlp(self.norm(x))


@contextlib.contextmanager
def _one_thread():
    """Run the router's tensor ops on one intra-op thread, restoring the caller's setting afterwards.

    Its ops are small (a 16-wide bag, two 256-wide layers): threads gain little on an idle CPU, and on
    a busy one OpenMP's barriers make them up to 30x slower (measured: 16 ms -> 430 ms per training
    step on 2 oversubscribed cores). One thread also fixes the reduction order, so probabilities do not
    depend on the calling process's thread count.
    """
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


def _stratified_split(
    labels: torch.Tensor, fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held-out): about ``fraction`` of every task held out, at least one of a task
    with two or more texts, never its last one."""
    train, held = [], []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_held = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[:n_held])
        train.append(members[n_held:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(held)).values


def _gather(
    indices: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The EmbeddingBag inputs ``(indices, offsets)`` of the texts ``rows`` (a vectorized slice gather)."""
    lens = torch.diff(offsets, append=torch.tensor([indices.numel()]))[rows]
    starts = offsets[rows]
    new_offsets = torch.cumsum(lens, 0) - lens
    flat = torch.repeat_interleave(starts - new_offsets, lens) + torch.arange(int(lens.sum()))
    return indices[flat], new_offsets


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
        common = (len(self.names), list(mlp["hidden"]), mlp["dropout"])
        if self.source == "hash":
            self.net = _RouterNet(
                *common, num_buckets=features["num_buckets"], embed_dim=features["embed_dim"]
            )
        else:
            self.net = _RouterNet(*common, input_dim=features["hidden_size"])
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
    def train(
        cls,
        texts: Sequence[str],
        tasks: Sequence[str],
        *,
        features: str = "hash",
        num_buckets: int = 2**18,
        embed_dim: int = 16,
        char_ngrams: tuple[int, int] = (2, 4),
        word_ngrams: int = 2,
        max_chars: int = 2048,
        model=None,
        tokenizer=None,
        max_length: int = 256,
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.1,
        heldout: float = 0.1,
        epochs: int = 30,
        patience: int = 3,
        batch_size: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.1,
        balance: str = "weight",
        seed: int = 0,
        verbose: bool = False,
    ) -> Router:
        """Train a router on labelled texts; returns it with ``report`` filled in.

        Args:
            texts, tasks: lists of str of equal length; each text is labelled with its task name (the
                adapter it should route to). At least two distinct tasks; no empty or blank text.
            features: ``"hash"`` (default): hashed word 1-2-grams and character n-grams, nothing to
                download, any language; ``"model"``: mean-pooled last hidden states of ``model``
                (a transformers model, with its ``tokenizer``), texts cut to ``max_length`` tokens.
            num_buckets, embed_dim: the hashed feature table (default 2^18 x 16: 4.2M of the ~4.3M
                parameters). char_ngrams: (min, max) character n-gram lengths of the lower-cased text
                padded with spaces (word boundaries); word_ngrams: word n-grams up to this length
                (1: unigrams, 0: none); max_chars: a text is cut to this many characters before hashing.
            hidden, dropout: the MLP's hidden widths and dropout.
            heldout: the fraction of each task held out (stratified) for early stopping and the report.
            epochs, patience: at most ``epochs`` passes; stop after ``patience`` epochs without a better
                held-out (accuracy, then loss); the best epoch's weights are kept.
            batch_size, lr, weight_decay: AdamW's settings.
            label_smoothing: of the cross-entropy. Keeps probabilities off 0 and 1, so that top-p can
                mix: on prompts joining sentences of two tasks, 0.1 gives both adapters at p = 0.6 to
                half of them (1 in 36 without), at unchanged accuracy (bench set: 99.2%).
            balance: ``"weight"`` (loss weighted by inverse task frequency) or ``"sample"`` (batches
                drawn with probability inverse to task frequency).
            seed: the same data and seed give the same router, bit for bit.
            verbose: show a tqdm progress bar and print the report at the end.
        """
        texts = _check_texts(texts)
        if isinstance(tasks, str) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks must be a list of str, got {type(tasks).__name__}")
        tasks = list(tasks)
        if len(texts) != len(tasks):
            raise ValueError(
                f"texts and tasks must have the same length, got {len(texts)} texts and {len(tasks)} tasks"
            )
        for i, t in enumerate(tasks):
            if not isinstance(t, str) or not t:
                raise ValueError(f"tasks[{i}] must be a non-empty str, got {t!r}")
        names = sorted(set(tasks))
        if len(names) < 2:
            raise ValueError(f"training needs at least two distinct tasks, got {names}")
        if features not in ("hash", "model"):
            raise ValueError(f"features must be 'hash' or 'model', got {features!r}")
        if features == "model" and (model is None or tokenizer is None):
            raise ValueError("features='model' needs model= (a transformers model) and tokenizer=")
        if not (
            isinstance(char_ngrams, Sequence)
            and len(char_ngrams) == 2
            and 1 <= char_ngrams[0] <= char_ngrams[1]
        ):
            raise ValueError(f"char_ngrams must be (min, max) with 1 <= min <= max, got {char_ngrams!r}")
        for name, value, low in (
            ("num_buckets", num_buckets, 1),
            ("embed_dim", embed_dim, 1),
            ("word_ngrams", word_ngrams, 0),
            ("max_chars", max_chars, 1),
            ("max_length", max_length, 1),
            ("epochs", epochs, 1),
            ("patience", patience, 1),
            ("batch_size", batch_size, 1),
        ):
            _check_number(name, value, low, 2**62, integer=True)
        if isinstance(hidden, (str, int)) or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden
        ):
            raise ValueError(
                f"hidden must list positive integer widths (empty: a linear layer), got {hidden!r}"
            )
        _check_number("dropout", dropout, 0, 1, high_open=True)
        _check_number("heldout", heldout, 0, 1, low_open=True, high_open=True)
        _check_number("label_smoothing", label_smoothing, 0, 1, high_open=True)
        _check_number("lr", lr, 0, math.inf, low_open=True, high_open=True)
        _check_number("weight_decay", weight_decay, 0, math.inf, high_open=True)
        if balance not in ("weight", "sample"):
            raise ValueError(f"balance must be 'weight' or 'sample', got {balance!r}")

        start_time = time.perf_counter()
        index_of = {n: i for i, n in enumerate(names)}
        labels = torch.tensor([index_of[t] for t in tasks], dtype=torch.int64)
        mlp = {"hidden": list(hidden), "dropout": dropout}
        if features == "hash":
            config = {
                "source": "hash",
                "num_buckets": num_buckets,
                "embed_dim": embed_dim,
                "char_ngrams": list(char_ngrams),
                "word_ngrams": word_ngrams,
                "max_chars": max_chars,
            }
            indices, offsets = featurize(texts, config)
            take = lambda rows: _gather(indices, offsets, rows)  # noqa: E731
            encoder = None
        else:
            vectors = pooled_hidden_states(texts, model, tokenizer, max_length)  # frozen: computed once
            config = {
                "source": "model",
                "hidden_size": vectors.shape[1],
                "max_length": max_length,
                "model_name": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
            }
            take = lambda rows: (vectors[rows],)  # noqa: E731
            encoder = (model, tokenizer)

        # fork_rng: training draws from the global RNG (init, dropout) under our seed, and leaves the
        # caller's RNG state as it was.
        with _one_thread(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            router = cls(names, config, mlp, encoder=encoder)
            train_rows, held_rows = _stratified_split(labels, heldout, gen)
            history, best_epoch = _fit(
                router.net,
                take,
                labels,
                train_rows,
                held_rows,
                len(names),
                gen,
                epochs=epochs,
                patience=patience,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                label_smoothing=label_smoothing,
                balance=balance,
                verbose=verbose,
            )
            held_loss, held_acc, predicted = _evaluate(router.net, take(held_rows), labels[held_rows])

        router.report = _report(
            names,
            labels[held_rows],
            predicted,
            held_loss,
            held_acc,
            train_seconds=round(time.perf_counter() - start_time, 3),
            epochs_run=len(history),
            best_epoch=best_epoch,
            num_train=len(train_rows),
            num_heldout=len(held_rows),
            num_parameters=router.num_parameters,
            history=history,
        )
        if verbose:
            print(format_report(router.report))
        return router

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
        on ``features="model"``). A missing directory or file raises ``FileNotFoundError``; a corrupt
        file, another format version or a missing model raises ``ValueError``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"router directory {str(directory)!r} does not exist")
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{str(path)!r} not found: {directory} is not a saved router")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from None
        if not isinstance(config, dict) or config.get("format") != _FORMAT_NAME:
            raise ValueError(f"{config_path} is not a dlplora router config (no 'format': '{_FORMAT_NAME}')")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {config.get('format_version')!r}; this version of "
                f"dlplora_triton reads format_version {FORMAT_VERSION}"
            )
        try:
            names, features = list(config["names"]), dict(config["features"])
            mlp = {
                "hidden": [int(h) for h in config["mlp"]["hidden"]],
                "dropout": float(config["mlp"]["dropout"]),
            }
            if features.get("source", "hash") == "hash":
                features["char_ngrams"] = [int(v) for v in features["char_ngrams"]]
                for key in ("num_buckets", "embed_dim", "word_ngrams", "max_chars"):
                    features[key] = int(features[key])
            elif features["source"] == "model":
                features["hidden_size"], features["max_length"] = (
                    int(features["hidden_size"]),
                    int(features["max_length"]),
                )
            else:
                raise ValueError(f"unknown feature source {features['source']!r}")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{config_path} is missing or has a malformed field: {err!r}") from None
        if len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{config_path}: 'names' must list at least two task names, got {names!r}")
        encoder = None
        if features.get("source") == "model":
            if model is None or tokenizer is None:
                raise ValueError(
                    f"{directory} routes on the hidden states of a transformers model "
                    f"({features.get('model_name') or 'unnamed'}): pass model= and tokenizer= to Router.load"
                )
            encoder = (model, tokenizer)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{weights_path} is not a readable safetensors file: {err}") from None
        with torch.random.fork_rng(
            devices=[]
        ):  # building the net draws initial weights: not the caller's RNG
            router = cls(names, features, mlp, report=config.get("report") or {}, encoder=encoder)
        expected = router.net.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            got = {k: list(v.shape) for k, v in state.items()}
            raise ValueError(f"{weights_path} does not match {config_path} (tensors {got})")
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


@torch.no_grad()
def _evaluate(net, inputs, labels) -> tuple[float | None, float | None, torch.Tensor]:
    """(mean cross-entropy, accuracy, predictions) of ``net`` on prepared inputs; None without texts."""
    net.eval()
    if labels.numel() == 0:
        return None, None, labels
    logits = net(*inputs)
    predicted = logits.argmax(dim=1)
    return F.cross_entropy(logits, labels).item(), (predicted == labels).double().mean().item(), predicted


def _fit(
    net,
    take,
    labels,
    train_rows,
    held_rows,
    num_tasks,
    gen,
    *,
    epochs,
    patience,
    batch_size,
    lr,
    weight_decay,
    label_smoothing,
    balance,
    verbose,
) -> tuple[list[dict], int]:
    """AdamW epochs with early stopping on the held-out rows; leaves the best epoch's weights in ``net``.

    ``take(rows)`` gives the net's inputs for a set of texts. Returns (per-epoch history, best epoch).
    Without held-out rows (every task has one text) it runs all ``epochs`` and keeps the last.
    """
    counts = torch.bincount(labels[train_rows], minlength=num_tasks).clamp(min=1).double()
    inverse = (counts.sum() / (num_tasks * counts)).float()  # per-task weight; all 1 for a balanced set
    loss_weight = inverse if balance == "weight" else None
    held_x, held_y = take(held_rows), labels[held_rows]
    # fused: one kernel per step instead of ~10 passes over the 4M-row table (20x faster on CPU).
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    best, best_key, best_epoch, stale, history = None, None, 0, 0, []
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc="training router", unit="epoch")
    try:
        for epoch in range(1, epochs + 1):
            net.train()
            if balance == "sample":
                order = train_rows[
                    torch.multinomial(inverse[labels[train_rows]], len(train_rows), True, generator=gen)
                ]
            else:
                order = train_rows[torch.randperm(len(train_rows), generator=gen)]
            total = 0.0
            for rows in torch.split(order, batch_size):
                logits = net(*take(rows))
                loss = F.cross_entropy(
                    logits, labels[rows], weight=loss_weight, label_smoothing=label_smoothing
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
            held_loss, held_acc, _ = _evaluate(net, held_x, held_y)
            train_loss = total / len(train_rows)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "heldout_loss": held_loss,
                    "heldout_accuracy": held_acc,
                }
            )
            if bar is not None:
                bar.set_postfix(
                    loss=f"{train_loss:.4f}", heldout_acc="n/a" if held_acc is None else f"{held_acc:.4f}"
                )
                bar.update(1)
            if held_acc is None:
                continue
            key = (held_acc, -held_loss)  # accuracy first; among equal accuracies the lower loss
            if best_key is None or key > best_key:
                best_key, best_epoch, stale = key, epoch, 0
                best = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
    finally:
        if bar is not None:
            bar.close()
    if best is None:
        return history, len(history)
    net.load_state_dict(best)
    net.eval()
    return history, best_epoch


def _report(names, truth, predicted, loss, accuracy, **extra) -> dict:
    """The training report: held-out accuracy and loss, per-task accuracy, the 5 most confused pairs."""
    num = len(names)
    confusion = torch.zeros(num, num, dtype=torch.int64)
    confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    per_task = {}
    for i, name in enumerate(names):
        n = int(confusion[i].sum())
        per_task[name] = {"accuracy": (int(confusion[i, i]) / n) if n else None, "count": n}
    off = confusion.clone()
    off.fill_diagonal_(0)
    pairs = []
    for flat in torch.argsort(off.flatten(), descending=True, stable=True)[:5].tolist():
        t, q = divmod(flat, num)
        if off[t, q] > 0:
            rate = int(off[t, q]) / int(confusion[t].sum())
            pairs.append({"true": names[t], "predicted": names[q], "count": int(off[t, q]), "rate": rate})
    return {
        "heldout_accuracy": accuracy,
        "heldout_loss": loss,
        "per_task": per_task,
        "confused_pairs": pairs,
        **extra,
    }


def format_report(report: dict) -> str:
    """The training report as text (what ``Router.train(verbose=True)`` and ``dlplora train-router`` print)."""
    if not report:
        return "no training report"
    accuracy = report["heldout_accuracy"]
    lines = [
        f"held-out accuracy {'n/a' if accuracy is None else f'{accuracy:.4f}'} on {report.get('num_heldout', '?')} texts "
        f"(trained on {report.get('num_train', '?')}; {report.get('epochs_run', '?')} epochs, best "
        f"{report.get('best_epoch', '?')}; {report.get('train_seconds', 0):.1f} s; "
        f"{report.get('num_parameters', 0):,} parameters)",
        "per task:",
    ]
    for name, row in report["per_task"].items():
        acc = "   n/a" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"  {name:20s} {acc}  ({row['count']} held out)")
    pairs = report["confused_pairs"]
    confused = ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']}, {p['rate']:.1%})" for p in pairs)
    lines.append("most confused: " + (confused or "none"))
    return "\n".join(lines)


def read_labelled_jsonl(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(texts, tasks)`` of a JSONL file whose lines are ``{"text": "...", "task": "..."}``.

    A missing file raises ``FileNotFoundError``; a line that is not such an object raises ``ValueError``
    naming the file and line (blank lines are skipped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {str(path)!r} not found")
    texts, tasks = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("text"), str)
            or not isinstance(row.get("task"), str)
        ):
            raise ValueError(f'{path}:{number}: expected {{"text": "...", "task": "..."}} with string values')
        texts.append(row["text"])
        tasks.append(row["task"])
    if not texts:
        raise ValueError(f"{path} holds no labelled texts")
    return texts, tasks
