"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input or settings; the message names the file and the problem."""
