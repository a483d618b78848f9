"""A Ctrl-C (SIGINT) during the command line's start-up -- the imports, before `main` runs -- is
kept, not lost: a shell starts background jobs with SIGINT ignored, and Python keeps it so, so
`meta-kernels train ... & kill -INT $!` would otherwise go unnoticed until training began and then
train to the end. The package installs `note` first thing when run as `meta-kernels`; `main` takes
over with Python's own handler (KeyboardInterrupt) and stops with exit code 130 if one came."""
from __future__ import annotations

import signal

_PENDING: list[int] = []


def _note(signum, frame) -> None:
    if _PENDING:  # a second one: stop at once
        raise KeyboardInterrupt
    _PENDING.append(signum)


def catch_interrupts() -> None:
    try:
        signal.signal(signal.SIGINT, _note)
    except (ValueError, OSError):  # not the main thread: nothing to do
        pass


_TOOK_OVER: list[bool] = []


def take_over() -> int | None:
    """From now on SIGINT raises KeyboardInterrupt (the command's own handling); the signal that
    came during start-up, if any."""
    if signal.getsignal(signal.SIGINT) is _note:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _TOOK_OVER.append(True)
    return _PENDING[0] if _PENDING else None


def hand_back() -> None:
    """When the command has decided its exit code: a later SIGINT (the second of a double Ctrl-C,
    arriving while the process exits) no longer turns it into a death by signal."""
    if _TOOK_OVER:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
