"""Ctrl-C that a library swallows still stops a command before it replaces an output.

A bare ``except`` around an optional third-party import can catch the KeyboardInterrupt a SIGINT raises;
the command would then run on and replace the old output. The CLI calls :func:`note_interrupts` for
every command, and every atomic write and folder move calls :func:`check_interrupted` first.
"""

from __future__ import annotations

import signal
import threading

_INTERRUPTED = False


def note_interrupts() -> None:
    """From now on remember a Ctrl-C (SIGINT) even where a library swallows the KeyboardInterrupt it raises (a
    bare ``except`` around an optional import): :func:`check_interrupted` then stops before any output is
    replaced. Python's own handler still runs. Only where SIGINT has that handler (not in a job started with
    SIGINT ignored) and in the main thread; the CLI calls it for every command."""
    global _INTERRUPTED
    _INTERRUPTED = False
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def remember(signum, frame):
        global _INTERRUPTED
        _INTERRUPTED = True
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, remember)


def check_interrupted() -> None:
    """Raises KeyboardInterrupt when a Ctrl-C was noted (:func:`note_interrupts`), even one a library swallowed."""
    if _INTERRUPTED:
        raise KeyboardInterrupt
