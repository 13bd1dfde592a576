"""Errors a user can cause.

Anything raised as a TinyserveError is the user's to fix (a bad path, a bad config, a prompt that does not
fit, a bad sampling value). The CLI prints its message as one line on stderr and exits with status 2;
everything else is a bug and keeps its traceback.
"""


class TinyserveError(Exception):
    """A problem with the user's input, reported as one clear line (exit status 2 in the CLI)."""
