"""Fakes for the domain's ports: a recording publisher and a clock the test moves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, select

from domain.db.models import runs
from domain.errors import BrokerUnavailable
from domain.ports import Dispatch


class FakePublisher:
    """Records what was published; `down=True` makes it fail like an unreachable broker.

    `on_publish` runs before recording, so a test can look at the database at publish time.
    """

    def __init__(self, on_publish: Callable[[Sequence[Dispatch]], None] | None = None) -> None:
        self.batches: list[list[Dispatch]] = []
        self.down = False
        self.on_publish = on_publish

    def publish(self, dispatches: Sequence[Dispatch]) -> None:
        if self.down:
            raise BrokerUnavailable("fake broker is down")
        if self.on_publish is not None:
            self.on_publish(dispatches)
        self.batches.append(list(dispatches))

    @property
    def published(self) -> list[Dispatch]:
        return [d for batch in self.batches for d in batch]


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class PreparingPublisher:
    """A publisher that builds its messages ahead (`prepare`) and sends them later; it notes, at
    prepare and at send, how many runs another connection can see. `publish` is refused: a
    caller that can prepare must."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[tuple[str, int, int]] = []

    def _visible(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(runs)).scalar_one())

    def publish(self, dispatches: Sequence[Dispatch]) -> None:
        raise AssertionError("a publisher that prepares is sent through prepare()")

    def prepare(self, dispatches: Sequence[Dispatch]) -> Callable[[], None]:
        self.seen.append(("prepare", len(dispatches), self._visible()))
        return lambda: self.seen.append(("send", len(dispatches), self._visible()))
