"""Starting a child that a test interrupts with SIGINT (a simulated Ctrl-C).

A shell starts a background job (``cmd &``, nohup, many CI runners and schedulers) with SIGINT and SIGQUIT
ignored, and Python keeps an inherited ``SIG_IGN`` for SIGINT: a child started from such a test run would
never see the simulated Ctrl-C. :func:`popen_interruptible` restores the default disposition in the child
before it starts, so the interrupt tests do not depend on how the suite was started.
"""

from __future__ import annotations

import signal
import subprocess


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def popen_interruptible(args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)`` with SIGINT and SIGQUIT at their defaults in the child."""
    return subprocess.Popen(args, preexec_fn=_default_sigint, **kwargs)  # noqa: PLW1509 (no threads started yet)
