"""Short crops of training texts: what teaches the router prompts as short as ``def fib(n):``.

The text set's texts are sentences and statements of at least 20 characters, while chat prompts can be
a few words or one line. Trained on whole sentences alone, the router saw no text whose hashed features
are as few as a short prompt's, and it routed ``def fib(n):`` to zh at 0.65 (docs/routing.md, "Short
prompts"). :func:`short_crops` cuts random windows of a few words out of the training texts, labelled
with their text's task, so short inputs are learned as well.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import numpy as np

__all__ = ["short_crops", "crop_units", "main_script"]

# A crop is counted in units: a run of non-space characters outside the CJK scripts is one unit (a word,
# a code token such as ``fib(n):``), and every CJK character or kana is a unit of its own (these scripts
# do not separate words with spaces; one or two characters is about one word).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_UNIT = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_CJK_CHARACTER = re.compile(rf"[{_CJK}]")


def _script(ch: str) -> str:
    """The script of a letter: ``"CJK"`` for Chinese characters and kana, else the first word of its
    Unicode name (LATIN, CYRILLIC, GREEK, ...)."""
    if _CJK_CHARACTER.match(ch):
        return "CJK"
    return unicodedata.name(ch, "UNKNOWN").split(" ")[0]


def main_script(text: str) -> str | None:
    """The script most of the letters of ``text`` are in (None without letters)."""
    counts = Counter(_script(ch) for ch in text if ch.isalpha())
    return counts.most_common(1)[0][0] if counts else None


def crop_units(text: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` character spans of the units of ``text`` (words; single CJK characters)."""
    return [m.span() for m in _UNIT.finditer(text)]


def short_crops(texts: list[str], per_text: int, max_units: int, seed: int) -> tuple[list[str], list[int]]:
    """Up to ``per_text`` crops of each text: a window of 1 to ``max_units`` consecutive units (length and
    start uniform), cut from the original text (its spacing kept). Returns ``(crops, source index)``.

    A text of one unit gives no crop (it is short already), nor a window without a letter of the text's
    main script: ``-a`` or ``/etc/passwd`` inside a Chinese sentence says nothing of Chinese, and labelled
    zh it would teach the router to send short Latin prompts (``def fib(n):``) to zh. The same ``texts``
    and ``seed`` give the same crops.
    """
    rng = np.random.default_rng(seed)
    crops, sources = [], []
    for index, text in enumerate(texts):
        units = crop_units(text)
        script = main_script(text)
        if len(units) < 2 or script is None:
            continue
        for _ in range(per_text):
            size = int(rng.integers(1, min(max_units, len(units) - 1) + 1))
            first = int(rng.integers(0, len(units) - size + 1))
            crop = text[units[first][0] : units[first + size - 1][1]]
            if any(ch.isalpha() and _script(ch) == script for ch in crop):
                crops.append(crop)
                sources.append(index)
    return crops, sources
