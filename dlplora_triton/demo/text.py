"""Terminal columns for the demos' tables: wide (CJK) characters take two columns, combining marks none.

``len`` counts characters, so a Japanese or Chinese prompt padded with ``str.ljust`` pushes every later
column of its row to the right. :func:`fit` cuts and pads by display width instead.
"""

from __future__ import annotations

import unicodedata

__all__ = ["display_width", "fit", "one_line"]


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal (East Asian wide and fullwidth characters count two)."""
    return sum(_char_width(ch) for ch in text)


def one_line(text: str) -> str:
    """``text`` on one line: whitespace runs (newlines included) become one space; a replacement
    character (a multi-byte character cut at the last generated token) is dropped."""
    return " ".join(text.replace("\ufffd", "").split())


def fit(text: str, width: int, pad: bool = True) -> str:
    """``text`` cut to at most ``width`` columns (a cut ends in "…") and, with ``pad``, padded with
    spaces to exactly ``width`` columns."""
    if display_width(text) > width:
        out, used = [], 0
        for ch in text:
            w = _char_width(ch)
            if used + w > width - 1:
                break
            out.append(ch)
            used += w
        text = "".join(out) + "…"
    return text + " " * (width - display_width(text)) if pad else text
