"""SIGTERM (a plain `kill`, a timeout, a scheduler) handled as Ctrl-C is: the interrupted step
stops where an interruption is safe, worker processes are stopped, one line says how to
continue. Left to its default, SIGTERM ends the process at once with nothing said."""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM where Ctrl-C raises KeyboardInterrupt (so every handler of one
    handles both)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def terminate_like_interrupt() -> None:
    """Make SIGTERM raise `Terminated` in the main thread (a no-op in other threads)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
