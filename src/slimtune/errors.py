"""The one exception type for mistakes a user can make (bad input, bad files, bad flags).

Raised where the input enters, caught once in the command line and printed as one line.
Bugs are not SlimtuneErrors: they stay tracebacks.
"""


class SlimtuneError(Exception):
    """A user-facing error: the message names the value at fault and what would be accepted."""
