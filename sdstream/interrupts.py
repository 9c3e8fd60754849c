"""Ctrl-C and SIGTERM, from the console script's first instruction: an interrupt is never lost.

The handler raises KeyboardInterrupt (Terminated for SIGTERM) where the program is, as Python's own does, and
also records it: some libraries swallow a KeyboardInterrupt raised inside their imports, or turn it into an
ImportError of a half-initialised module, so the orchestrator checks the record between phases and steps
(raise_if_pending) and the CLI's error boundary reports any error that follows an interrupt as the interrupt.
Signals after the first are ignored: cleaning up (closing the frame writer, writing run.json) and exiting are
not themselves interrupted.
"""

from __future__ import annotations

import signal

_received: int | None = None  # the first signal, once one came


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (frames and manifest kept) but exiting 143."""


def _handle(signum, frame):
    global _received
    if _received is not None:
        return  # already on the way out
    _received = signum
    for other in (signal.SIGINT, signal.SIGTERM):  # from now on only cleaning up, then exiting: ignore more of them
        signal.signal(other, signal.SIG_IGN)  # (a Python handler would be reset to "die" while Python shuts down)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install() -> None:
    """Take over SIGINT and SIGTERM (in the main thread; a no-op elsewhere)."""
    try:
        signal.signal(signal.SIGINT, _handle)
        signal.signal(signal.SIGTERM, _handle)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        pass


def received() -> int | None:
    """The signal that came (SIGINT or SIGTERM), or None."""
    return _received


def raise_if_pending() -> None:
    """Raise the interrupt again if one came and was swallowed on the way here."""
    if _received is not None:
        raise Terminated() if _received == signal.SIGTERM else KeyboardInterrupt()


def exit_code() -> int:
    return 143 if _received == signal.SIGTERM else 130


def reset() -> None:
    """Forget a handled interrupt and handle the next (tests that run the CLI in-process, one after another)."""
    global _received
    if _received is not None:
        _received = None
        install()
