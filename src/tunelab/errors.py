"""The one exception type that user-facing code raises for bad input.

The CLI prints `TunelabError` as a single line (no traceback) and exits with status 2, so every
message must say what was wrong *and* what to change.
"""


class TunelabError(Exception):
    """Bad input or an impossible request; the message names the fix."""
