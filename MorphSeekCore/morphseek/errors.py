"""The one exception type a user of MorphSeek sees: its message names the file (or input) and the problem."""


class MorphSeekError(Exception):
    """Bad input, missing checkpoint, out of memory, cancelled work: always with a clear message."""


class Cancelled(MorphSeekError):
    """Raised when the caller's cancel callback asks long work to stop."""
