"""The CLI's boundary: a quiet environment, masked secrets, and one exit status per outcome.

0 done (also when images were quarantined); 1 the run failed (one line, no traceback unless
LEUKOFLOW_DEBUG=1); 2 bad usage (click's usage message) or configuration (LeukoflowError: one
line on stderr).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from leukoflow.errors import LeukoflowError, StoreUnavailable
from leukoflow.redact import RedactSecrets, install_secret_masking, redact


def quiet_environment() -> None:
    """No telemetry, no TensorFlow chatter; set before Prefect or TensorFlow is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Prefect gives its ephemeral API 20 s to start; two sweeps starting at once on a busy
    # server can need more, and failing then would lose a night.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


class UserErrorFilter(logging.Filter):
    """Prefect logs a failed task's traceback; a user error needs only its one-line message."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if user_error(error) is not None or isinstance(error, StoreUnavailable):
            record.exc_info = None
            record.exc_text = None
        return True


def before_flow() -> None:
    """Call once a flow module is imported (Prefect's logging is configured then): user errors
    log one line, and no handler shows a credential."""
    install_secret_masking()
    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, UserErrorFilter) for f in handler.filters):
                handler.addFilter(UserErrorFilter())


def user_error(error: BaseException | None) -> LeukoflowError | None:
    """The LeukoflowError behind `error`, also when Ray wrapped it on the way from an actor."""
    if isinstance(error, LeukoflowError):
        return error
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, LeukoflowError) else None


def report_failure(error: BaseException) -> int:
    """One line on stderr for `error`; returns the exit status."""
    found = user_error(error)
    registry = sys.modules.get("leukoflow.store.registry")  # loaded if it raised ModelRefused
    if registry is not None and isinstance(found, registry.ModelRefused):
        # Not a usage error: the store holds a model that is not the one saved (exit 1).
        print(f"leukoflow: refused: {redact(str(found).splitlines()[0])}", file=sys.stderr)
        return 1
    if found is not None:
        print(f"leukoflow: error: {redact(str(found).splitlines()[0])}", file=sys.stderr)
        return 2
    if isinstance(error, StoreUnavailable):  # explained in one line; the store says why
        print(f"leukoflow: run failed: {redact(str(error).splitlines()[0])}", file=sys.stderr)
        return 1
    if os.environ.get("LEUKOFLOW_DEBUG"):
        print(redact("".join(traceback.format_exception(error))), file=sys.stderr)
    else:
        logging.getLogger("leukoflow").debug("run failed", exc_info=error)
    first = str(error).splitlines()[0] if str(error) else ""
    print(
        redact(f"leukoflow: run failed: {type(error).__name__}: {first} "
               "(LEUKOFLOW_DEBUG=1 for details)"),
        file=sys.stderr,
    )  # fmt: skip
    return 1


__all__ = ["RedactSecrets", "before_flow", "quiet_environment", "redact", "report_failure"]
