"""The one exception type for errors a user can cause (bad input, bad configuration).

The CLI maps it to exit status 2 with one line on stderr; anything else is a bug and is left to
surface as one.
"""


class LeukoflowError(Exception):
    """A usage or configuration error, explained in one line."""
