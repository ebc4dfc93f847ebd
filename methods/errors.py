"""The one exception type that means "the caller asked for something invalid".

Every entry point (the `lpc` CLI, recipes, loaders) raises `UsageError` for bad input; the CLI
turns it into a single line on stderr and exit status 2. Anything else is a bug and keeps its
traceback.
"""


class UsageError(ValueError):
    """Invalid user input: a bad option, a malformed file, an unsupported model."""


def invalid(what: str, error) -> UsageError:
    """One line for a pydantic ValidationError: the first problem, where it is, and the value given.

    `what` names the thing validated ("train option", "method 'flap': option", ...)."""
    import json

    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].replace("Value error, ", "", 1)
    if not where:  # a rule across several fields
        return UsageError(f"{what}s: {message}")
    return UsageError(f"{what} {where}: {message}, got {json.dumps(first.get('input'), default=str)}")
