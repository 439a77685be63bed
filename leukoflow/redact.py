"""Credential masking for every line leukoflow's processes show: logs, errors, artifacts.

Installed by the CLI and by each flow itself, so flow runs that a Prefect worker starts from a
deployment (no CLI in that process) mask credentials too. Bottom layer: imports nothing of ours.
"""

from __future__ import annotations

import logging
import os
import re

# Environment variables whose values are credentials.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_SERVER_API_AUTH_STRING",
    "RAY_AUTH_TOKEN",
    "LEUKOFLOW_MODEL_KEY",
    "LEUKOFLOW_FHIR_TOKEN",
)
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with credential values from the environment and user:password@ in URLs masked."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return _URL_USERINFO.sub(r"\1***@", text)


class RedactSecrets(logging.Filter):
    """Last line of defence: no log line shows a credential, whoever wrote it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a malformed record: logging reports it as such, leave it to that
        if redact(message) != message:
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_secret_masking() -> None:
    """Add the filter to every handler of every logger that exists now (idempotent).

    Handlers, not loggers: a filter on a logger does not see records that propagate to it from
    child loggers, while every record passes its handlers' filters. Prefect's API log handler is
    among them once Prefect has configured logging (it has, inside a flow run).
    """
    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())
