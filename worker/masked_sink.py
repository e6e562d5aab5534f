"""LineSink, what a run's lines, metrics and costs are written through, and MaskedSink, one that
masks secrets in everything written through it: messages, fields, metric names and labels,
cost providers and models. A run that knows secrets records through one."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any, Protocol

from domain.security.masking import Masker


class LineSink(Protocol):
    """The worker's log writer as a run's context sees it (worker/logwriter.py)."""

    def log(
        self,
        run_id: uuid.UUID,
        attempt: int,
        message: str,
        *,
        stream: str = "log",
        level: str = "info",
        fields: dict[str, Any] | None = None,
        ts: Any = None,
    ) -> int: ...

    def metric(
        self,
        run_id: uuid.UUID,
        name: str,
        value: float,
        labels: dict[str, Any] | None = None,
        ts: Any = None,
    ) -> None: ...

    def cost(
        self,
        run_id: uuid.UUID,
        attempt: int,
        step_seq: int | None,
        project: str,
        ts: Any,
        provider: str,
        model: str,
        tokens_in: int,
        tokens_out: int,
        requests: int,
        cost_usd: Decimal,
        /,
    ) -> None: ...


class MaskedSink:
    """Wraps the worker's writer for one run; the writer itself stays shared and unmasked."""

    def __init__(self, sink: LineSink, masker: Masker) -> None:
        self.sink = sink
        self.masker = masker

    def log(
        self,
        run_id: uuid.UUID,
        attempt: int,
        message: str,
        *,
        stream: str = "log",
        level: str = "info",
        fields: dict[str, Any] | None = None,
        ts: Any = None,
    ) -> int:
        mask = self.masker
        return self.sink.log(
            run_id,
            attempt,
            mask(str(message)),
            stream=stream,
            level=level,
            fields=mask.data(fields) if fields else fields,
            ts=ts,
        )

    def metric(
        self,
        run_id: uuid.UUID,
        name: str,
        value: float,
        labels: dict[str, Any] | None = None,
        ts: Any = None,
    ) -> None:
        mask = self.masker
        self.sink.metric(run_id, mask(name), value, mask.data(labels) if labels else labels, ts)

    def cost(
        self,
        run_id: uuid.UUID,
        attempt: int,
        step_seq: int | None,
        project: str,
        ts: Any,
        provider: str,
        model: str,
        tokens_in: int,
        tokens_out: int,
        requests: int,
        cost_usd: Decimal,
        /,
    ) -> None:
        mask = self.masker
        self.sink.cost(
            run_id, attempt, step_seq, project, ts, mask(provider), mask(model),
            tokens_in, tokens_out, requests, cost_usd,
        )  # fmt: skip
