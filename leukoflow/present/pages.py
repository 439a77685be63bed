"""The one Jinja2 environment for every page leukoflow writes, and the view-model pieces they share.

Pages (the evaluation report, the experiments page, the ops dashboard) render from templates in
present/templates: `base.html` holds the skeleton and the CSS once, each page extends it, and
`_macros.html` holds the table and figure partials. Data arrives as plain dataclasses built in
Python; templates only lay it out. HTML templates autoescape every value (StrictUndefined turns a
misspelt field into an error instead of an empty cell); Markdown templates (`*.md`) do not, and
escape their cells with the `md` filter instead. Pages must open offline, so images are data URIs.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from leukoflow.vocabulary import NON_CLINICAL_NOTICE

TEMPLATES = Path(__file__).with_name("templates")
DATA_URI_PREFIX = "data:image/png;base64,"


@dataclass(frozen=True)
class Row:
    """One table row: the first cell names it (a header cell), the rest are data cells."""

    cells: tuple[str, ...]
    css: str | None = None  # a class for the row, e.g. "best"


@dataclass(frozen=True)
class Table:
    """A table of text cells; the last `numeric` columns are right-aligned."""

    header: tuple[str, ...]
    rows: tuple[Row, ...]
    numeric: int = 0
    id: str | None = None


@dataclass(frozen=True)
class Plot:
    """An embedded PNG (a data: URI, so the page stays self-contained) with its caption."""

    uri: str
    caption: str
    id: str | None = None

    def __post_init__(self) -> None:
        # A remote image would make the page fetch from the network when opened.
        if not self.uri.startswith(DATA_URI_PREFIX):
            raise ValueError("page images must be PNG data URIs")


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    numeric: int = 0,
    best: int | None = None,
    id: str | None = None,
) -> Table:
    """A Table from plain rows of values (shown with str); row `best` gets the class "best"."""
    return Table(
        header=tuple(str(h) for h in header),
        rows=tuple(
            Row(tuple(str(c) for c in row), "best" if i == best else None)
            for i, row in enumerate(rows)
        ),
        numeric=numeric,
        id=id,
    )


def markdown_cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: markup escaped (Markdown is often shown as
    HTML), pipes escaped, newlines flattened."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


@cache
def environment() -> Environment:
    """The shared environment: autoescape for HTML, none for Markdown, undefined is an error."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = markdown_cell
    env.globals["non_clinical_notice"] = NON_CLINICAL_NOTICE
    return env


def render(template: str, **context: Any) -> str:
    """Render one template of present/templates with the given view model."""
    return environment().get_template(template).render(**context)
