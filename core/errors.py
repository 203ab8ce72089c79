"""The one exception type for mistakes a user can fix (bad config value, missing file, unknown name).

The `raf` command prints a `UserError` as one plain line and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's input. The message names the key, path or value and how to fix it."""
