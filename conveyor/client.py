"""`Client`: the Python way to create, watch and steer runs (`from conveyor import Client`)."""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine

from conveyor import bootstrap
from domain.clock import utc_now
from domain.db.unit_of_work import UnitOfWork
from domain.errors import InvalidInput, WaitTimeout
from domain.gc_pause import gc_paused
from domain.ports import Catalog, Publisher
from domain.runs import control, enqueue, signals
from domain.runs.delivery_checks import DeliveryCheck
from domain.runs.repository import RunFilter
from domain.runs.requests import build_request, build_requests, parse_duration
from domain.runs.signals import SignalView
from domain.runs.states import TERMINAL
from domain.runs.views import LogLine, Page, RunView, StepView
from domain.settings import Settings, get_settings
from domain.tasks.catalog import permissive


def as_run_id(value: str | uuid.UUID) -> uuid.UUID:
    """A run id from a UUID or its text; anything else is an InvalidInput naming the value."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value).strip())
    except ValueError:
        raise InvalidInput(f"run id: {value!r} is not a UUID", field="run_id") from None


class Client:
    """Talks to conveyor's database directly; settings come from CONVEYOR_* and `.env`.

    Creating a Client opens nothing: the engine is made on first use, and `close()` (or `with`)
    disposes it.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        engine: Engine | None = None,
        publisher: Publisher | None = None,
        catalog: Catalog | None = None,
        triggered_by: str = "client",
    ) -> None:
        self.settings = settings or get_settings()
        self._engine = engine
        self._owns_engine = engine is None
        #: None: runs are delivered by the relay (`conveyor scheduler`/`dev`) instead of at once.
        self.publisher = (
            publisher if publisher is not None else bootstrap.publisher_for(self.settings)
        )
        self._catalog = catalog
        self._delivery: DeliveryCheck | None = None
        self.triggered_by = triggered_by

    @property
    def catalog(self) -> Catalog:
        """What names and params are checked against: the tasks this process imports, else the
        catalog the workers published, else pipelines (domain/tasks/catalog.py)."""
        if self._catalog is None:
            self._catalog = bootstrap.catalog_for(self.settings, self.engine)
        return self._catalog

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = bootstrap.engine_for(self.settings)
        return self._engine

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.engine)

    def close(self) -> None:
        flush = getattr(self.publisher, "flush", None)
        if flush is not None:  # hear from the broker about runs enqueued (domain/ports.py)
            flush()
        if self._engine is not None and self._owns_engine:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- creating work ----------------------------------------------------------------------
    def enqueue(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        delay: str | float | timedelta | None = None,
        not_before: datetime | None = None,
        project: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        budget_usd: Decimal | str | float | None = None,
        max_requests: int | None = None,
        max_minutes: float | None = None,
        concurrency_key: str | None = None,
        concurrency_max: int | None = None,
        after: str | uuid.UUID | None = None,
        allow_unknown: bool = False,
        **extra: Any,
    ) -> RunView:
        """Create a run of task or pipeline `name`; with `idempotency_key`, at most one run.

        A name no worker has published (and this process does not import) is an UnknownTask
        listing the names that exist, unless `allow_unknown`: then the run waits, unchecked,
        for a worker that has it. With `after`, the run waits until that run ends: it starts
        if the parent succeeded and is cancelled (saying why) if not. `concurrency_key` (and
        `concurrency_max`, default the task's or 1): at most that many runs with the key run
        at once, the others wait holding no worker.
        """
        request = self._request(
            name,
            params,
            idempotency_key=idempotency_key,
            queue=queue,
            priority=priority,
            delay=delay,
            not_before=not_before,
            project=project,
            max_attempts=max_attempts,
            timeout=timeout,
            budget_usd=budget_usd,
            max_requests=max_requests,
            max_minutes=max_minutes,
            concurrency_key=concurrency_key,
            concurrency_max=concurrency_max,
            **extra,
        )
        return enqueue.enqueue(
            self.uow(),
            request,
            publisher=self.publisher,
            catalog=permissive(self.catalog) if allow_unknown else self.catalog,
            after=as_run_id(after) if after is not None else None,
        ).run

    def enqueue_many(
        self, items: Iterable[Mapping[str, Any]], *, allow_unknown: bool = False
    ) -> list[RunView]:
        """Create many runs in one transaction; each item holds enqueue()'s arguments.

        Example: `client.enqueue_many({"name": "resize", "params": {"id": i}} for i in ids)`.
        All items are validated first: one bad item refuses the whole batch, naming its index.
        """
        with gc_paused():  # a batch allocates much and frees it all at the end: see gc_pause
            loose = []
            for index, item in enumerate(items):
                if not isinstance(item, Mapping):
                    raise InvalidInput(
                        f"items[{index}]: expected a mapping such as "
                        f"{{'name': 'x', 'params': {{...}}}}, got {type(item).__name__}",
                        field="items",
                    )
                fields = dict(item)
                if "name" not in fields:
                    raise InvalidInput(f"items[{index}].name: missing", field="name")
                try:
                    loose.append(self._fields(**fields))
                except InvalidInput as exc:
                    raise InvalidInput(f"items[{index}].{exc}", field=exc.field) from None
            requests = build_requests(loose)  # one validation pass for the whole batch
            catalog = permissive(self.catalog) if allow_unknown else self.catalog
            results = enqueue.enqueue_many(
                self.uow(), requests, publisher=self.publisher, catalog=catalog
            )
            return [r.run for r in results]

    def _request(self, name: str, params: Mapping[str, Any] | None, **fields: Any) -> Any:
        return build_request(**self._fields(name=name, params=params, **fields))

    def _fields(
        self,
        *,
        params: Mapping[str, Any] | None = None,
        delay: Any = None,
        timeout: float | None = None,
        project: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """enqueue()'s arguments as EnqueueRequest fields (not validated yet)."""
        if delay is not None:  # text carries its unit ("10" is 10 what?); a number is seconds
            fields["delay_s"] = parse_duration(
                delay, field="delay", bare_seconds=False
            ).total_seconds()
        if timeout is not None:
            fields["timeout_s"] = timeout
        fields.setdefault("triggered_by", self.triggered_by)
        clean = {k: v for k, v in fields.items() if v is not None}
        clean["params"] = dict(params) if isinstance(params, Mapping) else params
        clean["project"] = project or self.settings.default_project
        return clean

    def warnings(self, run: RunView) -> builtins.list[str]:
        """What may keep a run just enqueued from starting: no live worker for its queue, or
        a task no worker has published or served lately (empty: nothing known)."""
        return self._checks().warnings(run, utc_now())

    def pending_reason(self, run: RunView) -> str:
        """Why a run is still pending, as far as conveyor can tell."""
        return self._checks().pending_reason(run, utc_now())

    def _checks(self) -> DeliveryCheck:
        if self._delivery is None:
            self._delivery = bootstrap.delivery_checks_for(self.engine)
        return self._delivery

    # -- reading ----------------------------------------------------------------------------
    def get(self, run_id: str | uuid.UUID) -> RunView:
        return control.get_run(self.uow(), as_run_id(run_id))

    def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        name: str | None = None,
        project: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """Runs newest first; pass `page.next_cursor` back as `cursor` for the next page."""
        statuses = [status] if isinstance(status, str) else list(status or ())
        filters = RunFilter(
            status=statuses,
            name=name,
            project=project,
            created_after=created_after,
            created_before=created_before,
        )
        return control.list_runs(self.uow(), filters, limit=limit, cursor=cursor)

    def logs(
        self, run_id: str | uuid.UUID, after_seq: int = 0, limit: int = 1000
    ) -> builtins.list[LogLine]:
        return control.run_logs(self.uow(), as_run_id(run_id), after_seq=after_seq, limit=limit)

    def steps(self, run_id: str | uuid.UUID) -> builtins.list[StepView]:
        with self.uow() as uow:
            rid = as_run_id(run_id)
            uow.runs.get(rid)
            return uow.runs.steps(rid)

    def wait(
        self, run_id: str | uuid.UUID, timeout: float = 30.0, *, poll_max_s: float = 1.0
    ) -> RunView:
        """Block until the run is terminal; WaitTimeout (with its current status) after `timeout`.

        Polls with backoff from 20 ms up to `poll_max_s`, so short runs return quickly and long
        ones cost little.
        """
        rid = as_run_id(run_id)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            run = self.get(rid)
            if run.status in TERMINAL:
                return run
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(
                    f"run {rid} is still {run.status} after {timeout:g}s", status=run.status
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, poll_max_s)

    # -- steering ---------------------------------------------------------------------------
    def cancel(
        self, run_id: str | uuid.UUID, *, actor: str = "client", reason: str = ""
    ) -> RunView:
        return control.cancel_run(self.uow(), as_run_id(run_id), actor=actor, reason=reason)

    def signal(
        self,
        run_id: str | uuid.UUID,
        name: str,
        payload: Any = None,
        *,
        key: str | None = None,
        actor: str = "client",
    ) -> SignalView:
        """Send the signal `name` with a JSON `payload` to a run: a `ctx.wait_for(name)` there
        returns it (one sent before the run waits is kept for it). A repeated `key` is the
        same signal, kept once; a run that has ended is a Conflict."""
        return signals.send(self.uow(), as_run_id(run_id), name, payload, key=key, actor=actor)

    def retry(self, run_id: str | uuid.UUID, *, actor: str = "client") -> RunView:
        return control.retry_run(
            self.uow(), as_run_id(run_id), actor=actor, publisher=self.publisher
        )
