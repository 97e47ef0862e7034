"""Text features of the sentence router: normalisation, hashed word, character and shape n-grams, pooled
hidden states of a transformers model. Hashing is a fixed function of the text (docs/routing.md)."""

from __future__ import annotations

import re
import unicodedata
import zlib

import numpy as np
import torch

__all__ = ["featurize", "text_shape", "pooled_hidden_states"]

_MOD = 2_147_483_647  # 2^31 - 1: a prime; h < 2^31 times a multiplier < 2^31 stays inside int64
_BASE = 1_000_003
_MIX = 1_597_334_677 % _MOD
_WORD = re.compile(r"\w+")


def _shape_class(ch: str) -> str:
    """A character's class in a text's shape: letters by script (Latin ``a``, Cyrillic ``c``, Greek
    ``g``, Han ``H``, hiragana ``h``, katakana ``k``, Hangul ``K``, other ``l``), digits ``0``, a space,
    and any other character (punctuation, symbols) as itself."""
    if ch.isalpha():
        code = ord(ch)
        if code < 0x250:
            return "a"
        if 0x370 <= code < 0x400:
            return "g"
        if 0x400 <= code < 0x530:
            return "c"
        if 0x3040 <= code < 0x30A0:
            return "h"
        if 0x30A0 <= code < 0x3100 or 0xFF66 <= code < 0xFFA0:
            return "k"
        if 0x3400 <= code < 0xA000 or 0xF900 <= code < 0xFB00:
            return "H"
        if 0xAC00 <= code < 0xD7B0 or 0x1100 <= code < 0x1200:
            return "K"
        return "l"
    if ch.isdigit():
        return "0"
    return ch


def text_shape(text: str) -> str:
    """``text`` with each character replaced by its class (:func:`_shape_class`) and runs of one class
    collapsed: ``def fib(n):`` -> ``a a(a):``. What a text's layout says whatever its words: calls,
    operators and indentation of code, the script of a prompt in any language."""
    # Both steps in C: str.translate through a table that fills itself (one _shape_class call per
    # distinct character ever seen), and a regex whose [^\W_] is exactly str.isalnum for str patterns.
    return _SAME_ALNUM_RUN.sub(r"\1", text.translate(_SHAPE_TABLE))


class _ShapeTable(dict):
    """``str.translate``'s table for :func:`text_shape`: code point -> class, computed on first use and
    kept for the first ``_SHAPE_TABLE_SIZE`` distinct code points (a client sending every code point
    does not grow it past a few MB)."""

    def __missing__(self, code: int) -> str:
        shape = _shape_class(chr(code))
        if len(self) < _SHAPE_TABLE_SIZE:
            self[code] = shape
        return shape


_SHAPE_TABLE_SIZE = 1 << 16
_SHAPE_TABLE = _ShapeTable()
_SAME_ALNUM_RUN = re.compile(r"([^\W_])\1+")


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
    # h starts at n * 7919 and takes n steps h = (h * _BASE + c + 1) mod _MOD: that is
    # (n * 7919 * _BASE^n + poly) mod _MOD, where poly of length n extends poly of length n - 1 by one
    # step, so all lengths together take ngram_max steps (exact integer arithmetic, below 2^52).
    shifted = codes + 1
    poly = np.zeros(total, dtype=np.int64)
    for n in range(1, ngram_max + 1):
        count = total - n + 1
        if count <= 0:
            break
        poly = (poly[:count] * _BASE + shifted[n - 1 : n - 1 + count]) % _MOD
        if n < ngram_min:
            continue
        h = (poly + n * 7919 * pow(_BASE, n, _MOD)) % _MOD
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

    ``features``: ``num_buckets``, ``char_ngrams`` ``[min, max]``, ``word_ngrams``, ``max_chars``, and
    optionally ``shape_ngrams`` ``[min, max]`` (character n-grams of :func:`text_shape`; absent or
    ``None``: none, as in routers saved before it).
    Returns ``(indices [F] int64, offsets [B] int64)`` for ``nn.EmbeddingBag``. Hashing runs in numpy:
    single-threaded vector ops, which on a busy CPU beat torch's thread pool on these small arrays.
    """
    norm = [_normalise(t, features["max_chars"]) for t in texts]
    lo, hi = features["char_ngrams"]
    char_h, char_owner = _char_ngram_hashes(norm, lo, hi)
    word_h, word_owner = _word_hashes(norm, features["word_ngrams"])
    # Salt the two families apart before bucketing, so a word and a character n-gram with equal raw
    # hashes do not share a bucket by construction.
    families, owners = [char_h, word_h * 31 + 17], [char_owner, word_owner]
    if features.get("shape_ngrams"):
        lo, hi = features["shape_ngrams"]
        shape_h, shape_owner = _char_ngram_hashes([text_shape(t) for t in norm], lo, hi)
        families.append(shape_h * 29 + 11)  # salted apart from the character n-grams of the text
        owners.append(shape_owner)
    hashes, owner = np.concatenate(families), np.concatenate(owners)
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
