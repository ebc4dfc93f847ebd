"""The one exception type that means "the caller asked for something invalid".

Every entry point (the `lpc` CLI, recipes, loaders) raises `UsageError` for bad input; the CLI
turns it into a single line on stderr and exit status 2. Anything else is a bug and keeps its
traceback.
"""


class UsageError(ValueError):
    """Invalid user input: a bad option, a malformed file, an unsupported model."""

