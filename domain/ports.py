"""Ports the domain calls out through; adapters live in worker/ (Celery) and tests (fakes)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from domain.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Dispatch:
    """What the broker needs to deliver one run: the id travels, never the row.

    `params` are only shown (Celery's `kwargsrepr` header, masked): the worker reads them from
    the run's row."""

    run_id: uuid.UUID
    name: str
    queue: str
    priority: int
    params: Mapping[str, Any] | None = None


class Publisher(Protocol):
    """Sends dispatches to the broker. Called only after the creating transaction commits.

    A publisher may also offer `prepare(dispatches) -> send`: it builds the messages (sending
    nothing), and calling `send()` after commit sends them, raising as `publish` would. Batch
    enqueues prepare while the database is still busy with their transaction (`send_later`).
    And `send_unconfirmed(dispatches, lost)`: publish without waiting for the broker to
    confirm, calling `lost()` later should it turn out the broker did not take them (with
    `flush()` to hear about every such send now). And `in_flight_limit`: how many published
    runs a queue may have unclaimed before new runs go out in turns between projects
    (domain/flow/fair.py); absent or 0, they never wait.
    """

    def publish(self, dispatches: Sequence[Dispatch]) -> None: ...


def in_flight_limit(publisher: Publisher) -> int:
    """The publisher's fair-share limit per queue (0: none)."""
    return int(getattr(publisher, "in_flight_limit", 0) or 0)


def send_later(publisher: Publisher, dispatches: Sequence[Dispatch]) -> Callable[[], None]:
    """The publisher's prepared send for `dispatches`, or a plain publish when it has none."""
    prepare = getattr(publisher, "prepare", None)
    if prepare is None:
        return lambda: publisher.publish(dispatches)
    send: Callable[[], None] = prepare(dispatches)
    return send


@dataclass(frozen=True, slots=True)
class TargetDefaults:
    """What a registered task or pipeline contributes to a run it did not get told."""

    kind: str = "task"
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    timeout_s: float | None = None
    #: Keyed concurrency (domain/flow/concurrency.py): set when the target has a limit; the
    #: key a template over params, a function of them, or None when only code can compute it.
    concurrency_max: int | None = None
    concurrency_key: str | Callable[..., str] | None = None
    #: The named rate limit a run takes one request of as it starts (domain/flow/rates.py).
    rate_limit: str | None = None


class Catalog(Protocol):
    """Knows which tasks and pipelines exist and what their params must look like."""

    def resolve(self, name: str, params: dict[str, Any]) -> tuple[TargetDefaults, dict[str, Any]]:
        """Defaults for `name` and its validated params; raises UnknownTask or InvalidInput."""
        ...


def require_known(catalog: Catalog, name: str) -> None:
    """UnknownTask unless `catalog` knows `name` (whatever params its runs will bring)."""
    try:
        catalog.resolve(name, {})
    except InvalidInput:  # a known task whose params are not given here
        return


class OpenCatalog:
    """Accepts any name with its params as given: for producers that know no registry."""

    def resolve(self, name: str, params: dict[str, Any]) -> tuple[TargetDefaults, dict[str, Any]]:
        return TargetDefaults(), params
