"""Throughput figures that mean something: a rate is reported only over a long enough window.

A rate read over one or two files, steps or epochs, or over a fraction of a second, says more about
timer noise and start-up than about the stage (a resumed synthesis that wrote two files once reported
1,760 images/s). Every reported rate goes through `rate()`: below `MIN_RATE_SECONDS` of wall time or
`MIN_RATE_EVENTS` units of work (files committed, steps, epochs) it is None, and `rate_note()` says why.
"""
from __future__ import annotations

MIN_RATE_SECONDS = 5.0
MIN_RATE_EVENTS = 3


def too_short(seconds: float, events: int) -> str | None:
    """Why a window cannot give a rate, or None when it can."""
    if events < MIN_RATE_EVENTS:
        return f"window of {events} unit(s) < {MIN_RATE_EVENTS}"
    if not seconds >= MIN_RATE_SECONDS:
        return f"window of {seconds:.2f} s < {MIN_RATE_SECONDS:g} s"
    return None


def rate(count: float, seconds: float, events: int, digits: int = 4) -> float | None:
    """count / seconds, rounded, or None when the window is too short to mean anything."""
    if too_short(seconds, events) is not None:
        return None
    return round(count / seconds, digits)


def rate_note(seconds: float, events: int, what: str = "rate") -> str | None:
    """One line for a summary explaining a null rate (None when the rate was reported)."""
    reason = too_short(seconds, events)
    if reason is None:
        return None
    return (f"{what} not reported: {reason} (rates need >= {MIN_RATE_EVENTS} units and "
            f">= {MIN_RATE_SECONDS:g} s)")
