"""In-process CLI calls that run a flow: Prefect's console log handler writes to the stderr it
was created with. Under pytest that is the capture of whichever test first configured Prefect's
logging, closed once that test ended, so a later flow's log lines fail with a logging error
(`ValueError: I/O operation on closed file` and a traceback on this test's stderr).

The fixture makes the handler write to whatever sys.stderr is at the time of each line: under
pytest the running test's capture, in a process its own stderr, which is where a CLI process's
Prefect log lines go too. The in-process answer then reads as the process's would: one
`leukoflow:` line among Prefect's own, no traceback. (The change stays for the rest of the
session: it only ever makes the handler follow the current stderr.)"""

from __future__ import annotations

import logging
import sys

import pytest


class CurrentStderr:
    """A stream that writes to sys.stderr as it is at the time of each write."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def prefect_console_on_this_tests_stderr():
    """Every test: Prefect's console handlers write to the running test's stderr."""
    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is None:  # Prefect not imported yet: its handlers will be made on this stderr
        return
    PrefectConsoleHandler = handlers.PrefectConsoleHandler  # noqa: N806
    names = list(logging.root.manager.loggerDict)
    for logger in [logging.getLogger(), *map(logging.getLogger, names)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(
                handler.stream, CurrentStderr
            ):
                handler.stream = CurrentStderr()
                handler.console.file = handler.stream
