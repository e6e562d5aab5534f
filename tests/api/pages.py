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
