"""The base class of every error a user can cause (bad input, a missing file, an unsupported target).

The CLI prints these as one line and exits with status 2; library users can catch ``UserError``.
"""


class UserError(Exception):
    """An error whose message is one line that says what is wrong and what to do."""


ERROR_CHARS = 300  # a one-line message quoting another tool's error keeps this many characters of it


def one_line(error: object, limit: int = ERROR_CHARS) -> str:
    """``error``'s text on one line (whitespace runs folded), cut to ``limit`` characters."""
    return " ".join(str(error).split())[:limit]


class TargetError(UserError, ValueError):
    """A target that cannot be built here; the message is one line and says what to do."""
