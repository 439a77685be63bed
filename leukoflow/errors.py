"""The exception type for errors a user can cause (bad input, bad configuration), and the one
for a store that stopped answering mid-run.

The CLI maps LeukoflowError to exit status 2 and StoreUnavailable to exit status 1 (the run
failed), each with one line on stderr; anything else is a bug and is left to surface as one.
"""


class LeukoflowError(Exception):
    """A usage or configuration error, explained in one line."""


class StoreUnavailable(Exception):
    """The store stopped answering (past the retry budget) or refused a write: the run failed."""
