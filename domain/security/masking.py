"""One masker for secret values, in every form a value takes when it is serialized.

A secret leaves a pipeline as plain text, but just as often inside something: a JSON document
(escaped, with or without `ensure_ascii`), a Python repr, a URL (percent-encoded, `+` for
spaces), base64. Masking only the plain text lets `"`, `\\` or non-ASCII characters carry the
value through in its escaped form, and a parser that decodes the line later (the `::conveyor::`
events) turns the escaped form back into plain text. So `Masker` replaces every form with `***`,
and `Masker.data` masks decoded JSON values (keys and strings, recursively) after parsing.

Base64 is masked for the value itself (`base64.b64encode(secret)`, standard and URL-safe, with
or without padding), not for a secret inside a larger encoded blob: the characters a value
becomes there depend on its byte offset, and masking every offset of short values would hide
ordinary base64 data.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
#: Shorter values would turn every occurrence of a common string into *** (and so reveal it).
MIN_SECRET_CHARS = 4

# Hex digits in escapes are matched in either case: JSON encoders differ (\u00e9 / \u00E9), and
# percent-encoding is case-insensitive (%2f / %2F).
_HEX_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}|\\u[0-9A-Fa-f]{4}|\\x[0-9A-Fa-f]{2}|\\U[0-9A-Fa-f]{8}")


def _json_ascii(value: str) -> str:
    return json.dumps(value)[1:-1]


def _json_unicode(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _repr(value: str) -> str:
    return repr(value)[1:-1]


#: Encoders a value commonly passes through once or twice (JSON inside JSON, a repr of JSON).
_ESCAPES: tuple[Callable[[str], str], ...] = (_json_ascii, _json_unicode, _repr)


def serialized_forms(value: str) -> set[str]:
    """The texts `value` becomes inside common serializations, each without its quotes."""
    raw = value.encode("utf-8", "surrogatepass")
    once = {value, ascii(value)[1:-1], repr(raw)[2:-1], *(escape(value) for escape in _ESCAPES)}
    forms = once | {escape(form) for form in once for escape in _ESCAPES}
    forms |= {quote(value, safe=""), quote(value), quote_plus(value), quote_plus(value, safe="/")}
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = encoded.decode()
        forms |= {text, text.rstrip("=")}
    return forms


def _pattern(form: str) -> str:
    out, last = [], 0
    for match in _HEX_ESCAPE.finditer(form):
        out.append(re.escape(form[last : match.start()]))
        token = match.group()
        out.append(re.escape(token[0]) if token[0] == "%" else re.escape(token[:2]))
        for char in token[1 if token[0] == "%" else 2 :]:
            out.append(f"[{char.lower()}{char.upper()}]" if char.isalpha() else char)
        last = match.end()
    out.append(re.escape(form[last:]))
    return "".join(out)


class Masker:
    """Replaces every serialized form of the given values with `***` (longest first)."""

    def __init__(self, values: Iterable[str]) -> None:
        pieces: set[str] = set()
        for value in values:
            if len(value) >= MIN_SECRET_CHARS:
                pieces.add(value)
            # A multi-line secret printed line by line is masked line by line too.
            pieces.update(p for p in value.splitlines() if len(p.strip()) >= MIN_SECRET_CHARS)
        forms = {form for piece in pieces for form in serialized_forms(piece)}
        self._forms = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(_pattern, self._forms))) if forms else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        """`text` with no form of any value left in it."""
        if self._pattern is None:
            return text
        # Again until nothing matches: the *** of one match can complete another form with the
        # text around it (a value made of asterisks), and every pass makes the text shorter.
        count = 1
        while count:
            text, count = self._pattern.subn(MASK, text)
        return text

    def cut_short(self, text: str) -> str:
        """`text` cut from something longer: the start of a form left at its end, too short
        for a match, is masked as well (the rest of the value was cut off, not its start)."""
        text = self(text)
        keep = len(text)
        for form in self._forms:
            # Only where the form's first character stands in the last len(form)-1 characters.
            start = text.find(form[0], max(0, len(text) - len(form) + 1))
            while start != -1 and start < keep:
                if form.startswith(text[start:]):
                    keep = start
                    break
                start = text.find(form[0], start + 1)
        return text if keep == len(text) else text[:keep] + MASK

    def data(self, value: Any) -> Any:
        """A JSON-like value with every string in it (keys included) masked, recursively."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {(self(k) if isinstance(k, str) else k): self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(item) for item in value]
        return value


#: Masks nothing: what a run without secrets records through.
NO_SECRETS = Masker(())


def mask(text: str, secret_values: Iterable[str]) -> str:
    """`text` with every secret value in it replaced by `***`."""
    return Masker(secret_values)(text)
