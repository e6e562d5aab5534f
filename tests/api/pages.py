"""Reading the HTML the API serves: the URLs a page makes a browser fetch or follow."""

from __future__ import annotations

import re
from html.parser import HTMLParser

#: Attributes whose value a browser loads or navigates to.
URL_ATTRIBUTES = frozenset(
    {"src", "href", "action", "formaction", "poster", "data", "srcset", "spec-url"}
)
#: URLs written into inline scripts and styles: `url: '/openapi.json'`, `url(/x.png)`, `"//x"`.
_INLINE = re.compile(r"""(?:url\s*[:(]\s*['"]?|['"])((?:https?:)?//[^'"\s)]+|/[^'"\s)]*)""")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._inline = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and name in URL_ATTRIBUTES:
                self.urls += (
                    [part.split()[0] for part in value.split(",")] if name == "srcset" else [value]
                )
            if value and name == "style":
                self.urls += _INLINE.findall(value)
        self._inline = tag in {"script", "style"}

    def handle_endtag(self, tag: str) -> None:
        self._inline = False

    def handle_data(self, data: str) -> None:
        if self._inline:
            self.urls += _INLINE.findall(data)


def urls_in(html: str) -> list[str]:
    """Every URL in `html`'s attributes, inline scripts and styles, in document order."""
    parser = _Links()
    parser.feed(html)
    return parser.urls


def is_local(url: str) -> bool:
    """Served by the same origin: a path or a relative reference, never a scheme or a host."""
    return not re.match(r"^([a-z][a-z0-9+.-]*:|//)", url, re.IGNORECASE) or url.startswith("#")


class _Table(HTMLParser):
    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id = table_id
        self.depth = 0  # > 0 inside the table
        self.rows: list[dict[str, object]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table" and (self.depth or attributes.get("id") == self.table_id):
            self.depth += 1
        elif self.depth and tag == "tr":
            self.rows.append({"attrs": attributes, "cells": []})
        elif self.depth and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self.depth:
            self.depth -= 1
        elif tag == "td" and self._cell is not None and self.rows:
            cells = self.rows[-1]["cells"]
            assert isinstance(cells, list)
            cells.append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table(html: str, table_id: str) -> list[tuple[dict[str, str | None], list[str]]]:
    """The body rows of the table with id `table_id`: each row's attributes and cell texts."""
    parser = _Table(table_id)
    parser.feed(html)
    found = []
    for row in parser.rows:
        attrs, cells = row["attrs"], row["cells"]
        assert isinstance(attrs, dict) and isinstance(cells, list)
        if cells:  # the header row has th cells only
            found.append((attrs, cells))
    return found


def csrf_of(html: str) -> str:
    """The CSRF token the page's forms carry."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None, "no form with a CSRF token on this page"
    return found.group(1)
