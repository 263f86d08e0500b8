"""The one exception type for mistakes a user can make (bad input, bad files, bad flags).

Raised where the input enters, caught once in the command line and printed as one line.
Bugs are not SlimtuneErrors: they stay tracebacks.
"""


class SlimtuneError(Exception):
    """A user-facing error: the message names the value at fault and what would be accepted."""

    def __init__(self, *args: object) -> None:
        # one line, whatever a library's message that was wrapped into it holds
        if len(args) == 1 and isinstance(args[0], str):
            args = (" ".join(line.strip() for line in args[0].splitlines() if line.strip()),)
        super().__init__(*args)
