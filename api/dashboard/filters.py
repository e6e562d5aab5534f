"""The runs filter as the dashboard's forms send it: read from a query string (the runs page,
a bulk confirmation) or a form (the bulk action itself), always into one RunFilter."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request

from domain.errors import InvalidInput
from domain.runs.repository import RunFilter
from domain.runs.states import ALL_STATUSES

#: The text fields of the filter form, in the order the page shows them.
TEXT = ("name", "project", "queue", "error")
TIMES = ("after", "before")
MAX_TEXT = 200
MAX_IDS = 200


@dataclass(frozen=True, slots=True)
class Chosen:
    """A filter as parsed, and as it goes back into links and hidden fields."""

    filters: RunFilter
    values: dict[str, str]  # the form's text and time fields as typed
    statuses: list[str]
    ids: list[str]

    @property
    def kept(self) -> list[tuple[str, str]]:
        """The filter as query pairs, for the pager's and the bulk links."""
        pairs = [("status", s) for s in self.statuses]
        pairs += [(key, value) for key, value in self.values.items() if value]
        return pairs + [("id", i) for i in self.ids]

    @property
    def empty(self) -> bool:
        return not self.kept


def _time(field: str, text: str) -> datetime | None:
    """A time from a datetime-local input (read as UTC) or an ISO timestamp with an offset."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"{field}: not a time (expected YYYY-MM-DDTHH:MM, UTC; got {text[:40]!r})",
            field=field,
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse(fields: Mapping[str, Sequence[str]]) -> Chosen:
    """`fields` (each name with all its values) → the filter; anything off is InvalidInput."""

    def one(name: str) -> str:
        values = fields.get(name) or [""]
        text = values[0].strip()
        if len(text) > MAX_TEXT:
            raise InvalidInput(f"{name}: at most {MAX_TEXT} characters", field=name)
        return text

    statuses = [s for s in fields.get("status", []) if s]
    unknown = [s for s in statuses if s not in ALL_STATUSES]
    if unknown:
        raise InvalidInput(f"status: unknown status {unknown[0]!r}", field="status")
    raw_ids = [i for i in fields.get("id", []) if i]
    if len(raw_ids) > MAX_IDS:
        raise InvalidInput(f"id: select at most {MAX_IDS} runs at once", field="id")
    try:
        ids = [uuid.UUID(i) for i in raw_ids]
    except ValueError:
        raise InvalidInput("id: not a run id", field="id") from None
    values = {name: one(name) for name in TEXT + TIMES}
    filters = RunFilter(
        status=statuses,
        name=values["name"] or None,
        project=values["project"] or None,
        queue=values["queue"] or None,
        error=values["error"] or None,
        created_after=_time("after", values["after"]),
        created_before=_time("before", values["before"]),
        ids=ids,
    )
    return Chosen(filters, values, statuses, [str(i) for i in ids])


def from_query(request: Request) -> Chosen:
    query = request.query_params
    return parse({key: query.getlist(key) for key in query})


QueryFilter = Annotated[Chosen, Depends(from_query)]
