"""edgecv: real-time edge video analytics daemon."""
__version__ = "0.1.0"


class EdgecvError(Exception):
    """An error in normal operation that is reported as one line, without a traceback."""


class UsageError(EdgecvError):
    """A value given on the command line (or a config) that cannot be used: exit 2, like an invalid config."""


class EdgecvWarning(UserWarning):
    """Soft misuse (a config that works but is probably not what was meant)."""
