"""Whether the demos' timings mean anything on this machine now: its load average against its cores.

The README's figures were measured on an idle machine. Other work on the same cores slows every path the
demo times, by amounts that differ per path, so a busy machine prints no timings at all, and an idle one
prints them with its load beside them.
"""

from __future__ import annotations

import os

__all__ = ["machine_load", "too_busy_to_time", "load_caveat"]


def machine_load() -> tuple[float, int]:
    """``(1-minute load average, CPU cores this process may use)``; load 0.0 where the OS has none."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        load = 0.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return load, cores


def too_busy_to_time(load: float, cores: int) -> bool:
    """More runnable work than cores: the timings would measure the other work as much as ours."""
    return load > cores


def load_caveat(load: float, cores: int) -> str:
    """The line printed with the timings, or instead of them on a busy machine."""
    if too_busy_to_time(load, cores):
        return (
            f"timings: none: the 1-minute load average is {load:.1f} on {cores} cores, so other work would "
            "distort them (run again on an idle machine)"
        )
    return (
        f"(1-minute load average {load:.1f} on {cores} cores before the runs; the README's figures are from "
        "an idle machine, and other work slows every path by a different amount)"
    )
