"""The base of every error a user can cause and fix: the CLI prints it as one line, no traceback."""


class UserError(Exception):
    """A problem with the user's input or environment; the message says what to do."""
