"""Errors a user can cause.

Anything raised as a TinyserveError is the user's to fix (a bad path, a bad config, a prompt that does not
fit, a bad sampling value). The CLI prints its message as one line on stderr and exits with status 2;
everything else is a bug and keeps its traceback.
"""

import numbers


class TinyserveError(Exception):
    """A problem with the user's input, reported as one clear line (exit status 2 in the CLI)."""


def is_integer(value) -> bool:
    """An integer, Python's or NumPy's, and not a bool: what a count or a size given by a user must be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
