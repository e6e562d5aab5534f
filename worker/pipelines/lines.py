"""A pipeline's output as log lines: split at newlines, cut at MAX_LINE_BYTES with a mark
saying how much was cut, undecodable bytes replaced."""

from __future__ import annotations

#: Longer lines are cut (the rest of the line is counted, not kept): one runaway line must
#: neither fill the worker's memory nor become a row nobody can display.
MAX_LINE_BYTES = 64 * 1024


CUT_MARK = " …[truncated "


class LineSplitter:
    """Bytes in, complete lines out; a line longer than `cap` is cut and the rest counted."""

    def __init__(self, cap: int = MAX_LINE_BYTES) -> None:
        self.cap = cap
        self._partial = bytearray()
        self._dropped = 0

    def feed(self, data: bytes) -> list[str]:
        parts = data.split(b"\n")
        out: list[str] = []
        if len(parts) > 1:
            self._add(parts[0])
            out.append(self._take())
            for part in parts[1:-1]:
                if len(part) <= self.cap:
                    out.append(_decode(part))
                else:
                    out.append(_decode(part[: self.cap], len(part) - self.cap))
        self._add(parts[-1])
        return out

    def close(self) -> list[str]:
        return [self._take()] if self._partial or self._dropped else []

    def _add(self, chunk: bytes) -> None:
        room = self.cap - len(self._partial)
        if len(chunk) <= room:
            self._partial += chunk
        else:
            self._partial += chunk[: max(room, 0)]
            self._dropped += len(chunk) - max(room, 0)

    def _take(self) -> str:
        line = _decode(bytes(self._partial), self._dropped)
        self._partial.clear()
        self._dropped = 0
        return line


def _decode(raw: bytes, dropped: int = 0) -> str:
    text = raw.decode("utf-8", "replace")
    if text.endswith("\r"):
        text = text[:-1]
    return f"{text}{CUT_MARK}{dropped} bytes]" if dropped else text


def split_cut(line: str) -> tuple[str, str]:
    """(what is left of a line the splitter cut, the note saying so); the note is "" when the
    line is whole."""
    text, mark, rest = line.rpartition(CUT_MARK)
    if not mark or not rest.endswith(" bytes]") or not rest[: -len(" bytes]")].isdigit():
        return line, ""
    return text, mark + rest
