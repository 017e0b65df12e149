"""The base class of every error a user can cause (bad input, a missing file, an unsupported target).

The CLI prints these as one line and exits with status 2; library users can catch ``UserError``.
"""


class UserError(Exception):
    """An error whose message is one line that says what is wrong and what to do."""
