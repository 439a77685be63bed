"""How commands print: one JSON line for scripts, rich text for people, ids never folded."""

from __future__ import annotations

import json

from rich.console import Console

# Wide enough that nothing a command prints is ever wrapped when stdout is a pipe or a file.
UNWRAPPED_WIDTH = 10_000


def console() -> Console:
    """A console for stdout: the terminal's width at a terminal; unwrapped anywhere else, so
    that ids a user copies (model ids, run ids, paths) and lines a script greps stay whole."""
    terminal = Console()
    if terminal.is_terminal:
        return terminal
    return Console(width=UNWRAPPED_WIDTH, soft_wrap=True)


def print_json(value: object) -> None:
    """The --json line: one object, the last line of stdout."""
    print(json.dumps(value, default=str))


def number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)


def text(value: object) -> str:
    if isinstance(value, tuple):
        return " / ".join(number(v) for v in value)
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return "n/a" if value is None else str(value)
