"""The one small exception hierarchy of sensq.

Every error a user can cause derives from :class:`SensqError`; the CLI prints its message as one
line (what went wrong, the bad value, the fix) and exits with :attr:`SensqError.exit_code`.
"""


class SensqError(Exception):
    """Base class of every error sensq raises on purpose."""

    exit_code = 1


class FormatError(SensqError, ValueError):
    """An unknown number format, or a format option it does not have."""


class InputError(SensqError, ValueError):
    """A tensor or file the caller passed in cannot be processed as asked (dtype, dim, shape, schema)."""


class BackendUnavailableError(SensqError, RuntimeError):
    """A backend was asked for explicitly but cannot run here (missing package or device)."""


class OutputError(InputError):
    """An output cannot be written: a missing or unwritable folder, someone else's file in the way, a full
    disk, another sensq command writing the same output."""


class InterruptedRun(SensqError):
    """The user interrupted a long command (Ctrl-C); what is complete is kept and the same command resumes."""

    exit_code = 130

