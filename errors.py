"""The one exception type for mistakes a user can make (a typo in a config key, a missing file,
a rank larger than the layer, ...). Scripts catch it and print a single `error: ...` line."""

import sys


class UserError(ValueError):
    """Something the user can fix. The message is one line: what is wrong, and how to fix it."""


def excepthook(exc_type, exc, tb):
    """Print UserError as one line and exit 2; every other exception keeps its full traceback."""
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.__excepthook__(exc_type, exc, tb)


def install():
    """Scripts call this first, so a UserError anywhere below stops the run with one clear line."""
    sys.excepthook = excepthook
