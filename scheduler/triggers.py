"""Fire times for schedules, computed with APScheduler 3.11's triggers, with crontab meaning.

Three things differ between crontab and APScheduler's CronTrigger, and are fixed here:
- day-of-week numbers: crontab's 0 (and 7) is Sunday; APScheduler's 0 is Monday;
- day-of-month and day-of-week both restricted: crontab fires when EITHER matches;
  APScheduler needs both (so we combine two triggers with OrTrigger);
- a fixed wall-clock time in the hour repeated when clocks fall back (02:30 in Europe/Berlin)
  would fire twice; like cron, a schedule with a fixed hour fires once that day.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from domain.errors import InvalidInput
from domain.runs.requests import parse_duration

DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DOW_PART = re.compile(r"^(\*|\d+(?:-\d+)?)(?:/(\d+))?$")


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(
            f"timezone: {name!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)",
            field="timezone",
        ) from None


def _crontab_dow(field: str) -> str:
    """Crontab day-of-week (0/7 = Sunday, names allowed) → APScheduler's, as day names."""
    if field == "*":
        return "*"
    out: list[str] = []
    for part in field.lower().split(","):
        match = _DOW_PART.match(part)
        if not match:
            out.append(part)  # names such as mon-fri: the same in both
            continue
        span, step = match.group(1), int(match.group(2) or 1)
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            first, last = (int(x) for x in span.split("-"))
        else:
            first = last = int(span)
            if match.group(2):
                last = 6
        if not (0 <= first <= 7 and 0 <= last <= 7) or step < 1:
            raise InvalidInput(f"cron: day of week {part!r} is out of range 0-7", field="cron")
        out.extend(DAY_NAMES[d] for d in range(first, last + 1, step))
    return ",".join(dict.fromkeys(out))


def cron_trigger(expression: str, tz: ZoneInfo) -> BaseTrigger:
    """A trigger for a 5-field crontab expression, or 6 fields with seconds first."""
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise InvalidInput(
            f"cron: {expression!r} has {len(fields)} fields; expected 5 "
            "(minute hour day month weekday) or 6 (second first)",
            field="cron",
        )
    second = fields.pop(0) if len(fields) == 6 else "0"
    minute, hour, day, month, dow = fields
    try:
        common: dict[str, Any] = {
            "second": second,
            "minute": minute,
            "hour": hour,
            "month": month,
            "timezone": tz,
        }
        if day != "*" and dow != "*":
            trigger: BaseTrigger = OrTrigger(
                [
                    CronTrigger(day=day, day_of_week="*", **common),
                    CronTrigger(day="*", day_of_week=_crontab_dow(dow), **common),
                ]
            )
        else:
            trigger = CronTrigger(day=day, day_of_week=_crontab_dow(dow), **common)
    except ValueError as exc:
        raise InvalidInput(f"cron: {expression!r} is not valid: {exc}", field="cron") from None
    return trigger


@dataclass(frozen=True)
class TriggerSpec:
    """A validated schedule trigger: cron, interval or once."""

    kind: str
    expression: str
    timezone: str = "UTC"
    start_at: datetime | None = None
    end_at: datetime | None = None

    def build(self) -> BaseTrigger:
        tz = zone(self.timezone)
        if self.kind == "cron":
            return cron_trigger(self.expression, tz)
        if self.kind == "interval":
            seconds = parse_duration(self.expression, field="every").total_seconds()
            if seconds <= 0:
                raise InvalidInput("every: an interval must be longer than zero", field="every")
            start = self.start_at or datetime(2000, 1, 1, tzinfo=UTC)
            return IntervalTrigger(seconds=seconds, start_date=start, timezone=tz)
        if self.kind == "once":
            return DateTrigger(run_date=parse_instant(self.expression, tz), timezone=tz)
        raise InvalidInput(f"trigger: {self.kind!r} is not cron, interval or once", field="trigger")

    @property
    def fixed_hour(self) -> bool:
        """Cron with a fixed hour: fires once on a fall-back day (see module docstring)."""
        if self.kind != "cron":
            return False
        fields = self.expression.split()
        hour = fields[2] if len(fields) == 6 else fields[1]
        return not any(ch in hour for ch in "*/-,")


def parse_instant(text: str, tz: ZoneInfo) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"at: {text!r} is not a date and time (e.g. 2026-12-01T09:00 or ...Z)", field="at"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=tz)


class Slots:
    """The fire times of one schedule, in order, after a given instant."""

    def __init__(self, spec: TriggerSpec) -> None:
        self.spec = spec
        self.trigger = spec.build()
        self.tz = zone(spec.timezone)

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire time strictly after `after` (UTC), or None when there is no more."""
        previous: datetime | None = None  # not a fire time: slots stay aligned to the start
        now = after + timedelta(microseconds=1)
        while True:
            nxt: datetime | None = self.trigger.get_next_fire_time(previous, now)
            if nxt is None:
                return None
            nxt = nxt.astimezone(UTC)
            if self.spec.end_at is not None and nxt > self.spec.end_at:
                return None
            if self.spec.start_at is not None and nxt < self.spec.start_at:
                previous, now = nxt, nxt + timedelta(microseconds=1)
                continue
            if nxt <= after:
                previous, now = nxt, after + timedelta(microseconds=1)
                continue
            if self.spec.fixed_hour and self._second_of_fold(nxt):
                previous, now = nxt, nxt + timedelta(microseconds=1)
                continue
            return nxt

    def _second_of_fold(self, instant: datetime) -> bool:
        local = instant.astimezone(self.tz)
        first = local.replace(tzinfo=None).replace(tzinfo=self.tz, fold=0)
        return first.utcoffset() != local.utcoffset()

    def between(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Fire times in (after, until]."""
        current = after
        while True:
            nxt = self.next_after(current)
            if nxt is None or nxt > until:
                return
            yield nxt
            current = nxt

    def preview(self, after: datetime, count: int) -> list[datetime]:
        out: list[datetime] = []
        current = after
        while len(out) < count:
            nxt = self.next_after(current)
            if nxt is None:
                break
            out.append(nxt)
            current = nxt
        return out
