"""The one check of route options (``p``, ``top_k``, ``weighting``, ``min_confidence``,
``base_threshold``): the API (:func:`~dlplora_triton.routing.top_p_select`, ``Router.route``), the
``dlplora`` commands, ``dlplora serve`` and the routed server's ``"routing"`` object all call
:func:`check_route_options`; each maps its :class:`RouteOptionError` to its own form (the API raises it,
a command prints one line and exits 2, the server answers 400), naming the field its own way
(``p``, ``--p``, ``routing.p``). No torch import: the command line checks before it loads anything."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from .defaults import DEFAULT_P, DEFAULT_WEIGHTING, WEIGHTINGS

__all__ = ["RouteOptionError", "RouteOptions", "check_route_options"]


class RouteOptionError(ValueError):
    """A bad route option: ``field`` (``"p"``, ``"top_k"``, ...) and ``problem`` (``"must be ..., got ..."``);
    ``str()`` is ``"<field> <problem>"``, :meth:`named` the same under another name (``--p``, ``routing.p``)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def named(self, name: str) -> str:
        """The message with the field called ``name``: ``err.named("--top-k")``."""
        return f"{name} {self.problem}"


@dataclass(frozen=True)
class RouteOptions:
    """Checked route options; numbers as float, ``None`` where the caller's default applies."""

    p: float = DEFAULT_P
    top_k: int | None = None
    weighting: str = DEFAULT_WEIGHTING
    min_confidence: float | None = None
    base_threshold: float | None = None


def _shown(value) -> str:
    try:
        return f"{value!r:.40}"  # a client's value, cut: a 1 MB string is not echoed back
    except ValueError:  # an int too long for repr
        return f"a {type(value).__name__} too long to show"


def _number(field: str, value, low_open: bool) -> float:
    """``value`` as float if it is a finite number in ``(0, 1]`` (``low_open``) or ``[0, 1]``."""
    # An int is finite (and math.isfinite of a huge one would overflow); a bool is not a number here.
    ok = not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    )
    if not ok or not (value > 0 if low_open else value >= 0) or not value <= 1:
        raise RouteOptionError(
            field, f"must be a number in {'(' if low_open else '['}0, 1], got {_shown(value)}"
        )
    return float(value)


def check_route_options(
    *,
    p=DEFAULT_P,
    top_k=None,
    weighting=DEFAULT_WEIGHTING,
    min_confidence=None,
    base_threshold=None,
    max_top_k: int | None = None,
    max_top_k_why: str | None = None,
    explicit: Collection[str] = (),
) -> RouteOptions:
    """Check route options; the checked :class:`RouteOptions`, or :class:`RouteOptionError` (a
    ``ValueError``) naming the first bad field, in the order of the arguments.

    Rules: ``p`` a finite number in (0, 1]; ``top_k`` ``None`` (no cap) or an integer >= 1, at most
    ``max_top_k`` when given (``max_top_k_why`` says where that limit comes from, e.g. "this server's
    max_loras"); ``weighting`` one of ``WEIGHTINGS``; ``min_confidence`` ``None`` or a number in [0, 1];
    ``base_threshold`` ``None`` (the router's own) or a number in (0, 1]. Booleans are not numbers.
    ``None`` means "the default" only for the fields not in ``explicit``: a field a client or a flag set
    explicitly (a JSON ``null``) must hold a value.
    """
    p = _number("p", p, low_open=True)
    if top_k is not None or "top_k" in explicit:
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, int)
            or top_k < 1
            or (max_top_k is not None and top_k > max_top_k)
        ):
            none = "" if "top_k" in explicit else "None or "
            if max_top_k is None:
                rule = f"{none}an integer >= 1"
            else:
                rule = f"{none}an integer from 1 to {max_top_k}" + (
                    f" ({max_top_k_why})" if max_top_k_why else ""
                )
            raise RouteOptionError("top_k", f"must be {rule}, got {_shown(top_k)}")
    if weighting not in WEIGHTINGS:
        raise RouteOptionError("weighting", f"must be one of {WEIGHTINGS}, got {_shown(weighting)}")
    if min_confidence is not None or "min_confidence" in explicit:
        min_confidence = _number("min_confidence", min_confidence, low_open=False)
    if base_threshold is not None or "base_threshold" in explicit:
        base_threshold = _number("base_threshold", base_threshold, low_open=True)
    return RouteOptions(p, top_k, weighting, min_confidence, base_threshold)
