"""What a run spends, as its context records it: `ctx.cost` and `ctx.reserve` (TaskContext
inherits them from here). An entry is buffered with the log lines when nothing has to be
checked before more money is spent; otherwise it is written at once, with the run's totals and
the project's month, and stops the run once a budget or limit is over."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from domain.costs import ledger as costs
from domain.costs import reservations
from domain.costs.prices import Prices
from domain.runs.store import Claim
from domain.security.masking import Masker
from worker.masked_sink import LineSink
from worker.steps import StepRunner

if TYPE_CHECKING:
    from worker.rates import Grant


class Spending:
    """The spending half of TaskContext (worker/context.py), which sets these attributes."""

    _claim: Claim
    _prices: Prices
    _engine: Engine
    _sink: LineSink
    _clock: Callable[[], datetime]
    _masker: Masker
    _stop: threading.Event
    _lock: threading.Lock
    _buffer_costs: bool | None
    _reservations: list[int]
    _current_step: int | None
    _steps: StepRunner

    # TaskContext's own methods, which spending calls:
    log: Callable[..., None]
    stop: Callable[[str, str], None]
    check_cancel: Callable[[], None]
    _grants: list[Grant]
    _settle_grant: Callable[[int], None]

    def cost(
        self,
        provider: str,
        model: str,
        tokens_in: int = 0,
        tokens_out: int = 0,
        usd: Decimal | str | int | None = None,
        requests: int = 1,
    ) -> None:
        """Record spend (to the run, its step and its project's month); stops the run with
        BudgetExceeded once it is over budget_usd, max_requests or a monthly project limit.

        Pass `usd` as a string or Decimal (floats cannot hold money exactly), or leave it out to
        have it computed from the price table (prices.toml); an unknown model is recorded at 0
        with a warning, never a crash. Amounts are kept to 10 decimal places (rounded half up).

        A run with no budget, in a project with no monthly limit, outside `reserve()`, has
        nothing to check per call: its entries are buffered like log lines and written in
        batches with its totals, all before its final state.

        After `ctx.acquire(..., tokens=estimate)`, the tokens given here settle the oldest
        grant still open (the estimate corrected to the actual, domain/flow/rates.py).
        """
        # The usual values are checked inline (this runs per LLM call, sometimes in tight
        # loops); anything else goes through the validators, which raise with the reason.
        if type(provider) is not str or not 0 < len(provider) <= 100 or "\x00" in provider:
            provider = costs.as_label(provider, field="provider", most=100)
        if type(model) is not str or not 0 < len(model) <= 200 or "\x00" in model:
            model = costs.as_label(model, field="model", most=200)
        if type(tokens_in) is not int or not 0 <= tokens_in <= costs.MAX_INT64:
            tokens_in = costs.as_tokens(tokens_in, field="tokens_in")
        if type(tokens_out) is not int or not 0 <= tokens_out <= costs.MAX_INT64:
            tokens_out = costs.as_tokens(tokens_out, field="tokens_out")
        if type(requests) is not int or not 0 <= requests <= costs.MAX_INT32:
            requests = costs.as_tokens(requests, field="requests", most=costs.MAX_INT32)
        if self._grants:
            self._settle_grant(tokens_in + tokens_out)
        if self._masker:
            provider, model = self._masker(provider), self._masker(model)
        if usd is None:
            priced = self._prices.cost(provider, model, tokens_in, tokens_out)
            if priced is None:
                self.log(
                    f"no price for {provider}/{model}: recorded with cost 0",
                    level="warning",
                    provider=provider,
                    model=model,
                )
            amount = costs.as_entry_usd(priced if priced is not None else Decimal(0))
        else:
            amount = costs.as_entry_usd(usd)
        step = self._current_step
        if self._buffer_costs is None:
            self._buffer_costs = self._nothing_to_enforce()
        # Inside a checkpointed step the entry is written at once: the step's completion may
        # commit before the buffer is flushed, and a worker killed then would lose what the
        # step spent, which no later attempt records again (it replays the step).
        if self._buffer_costs and not self._reservations and self._steps.key is None:
            claim = self._claim
            self._sink.cost(
                claim.run_id, claim.attempt, step, claim.project, self._clock(),
                provider, model, tokens_in, tokens_out, requests, amount,
            )  # fmt: skip
            if self._stop.is_set():
                self.check_cancel()
            return
        entry = {
            "project": self._claim.project,
            "ts": self._clock(),
            "provider": provider,
            "model": model,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "requests": requests,
            "cost_usd": amount,
            "step_seq": step,
        }
        with self._engine.begin() as conn:
            totals, project_over = costs.record(
                conn,
                self._claim.run_id,
                self._claim.attempt,
                self._claim.project,
                entry,
                reservation_id=self._reservations[-1] if self._reservations else None,
                spawned=self._claim.triggered_by == "spawn",
            )
        if totals.budget_usd is not None and Decimal(totals.cost_usd) > Decimal(totals.budget_usd):
            over = Decimal(totals.cost_usd) - Decimal(totals.budget_usd)
            self.stop("budget_exceeded", f"budget_usd {totals.budget_usd} exceeded by {over}")
        elif totals.max_requests is not None and totals.requests_made > totals.max_requests:
            self.stop(
                "budget_exceeded",
                f"max_requests {totals.max_requests} exceeded ({totals.requests_made} made)",
            )
        elif project_over is not None:
            self.stop("budget_exceeded", project_over)
        self.check_cancel()

    def _nothing_to_enforce(self) -> bool:
        """True when no run budget and no project limit applies (one query per run). A spawned
        run's spend counts toward its parent's budget, so it is always checked."""
        claim = self._claim
        if claim.budget_usd is not None or claim.max_requests is not None:
            return False
        if claim.triggered_by == "spawn":
            return False
        with self._engine.connect() as conn:
            limits = costs.limits_of(conn, self._claim.project)
        return limits.cost_usd is None and limits.tokens is None

    @contextmanager
    def reserve(self, usd: Decimal | str | int = 0, tokens: int = 0) -> Iterator[None]:
        """Reserve headroom before an expensive call; released when the block ends (the actual
        spend is what `cost()` records inside it). Raises BudgetExceeded, stopping the run, when
        the run's budget or the project's monthly limit cannot cover it."""
        reservation = reservations.reserve(
            self._engine,
            self._claim.run_id,
            self._claim.project,
            usd=costs.as_money(usd, field="usd"),
            tokens=costs.as_tokens(tokens, field="tokens"),
            now=self._clock(),
        )
        with self._lock:
            self._reservations.append(reservation)
        try:
            yield
        finally:
            with self._lock:
                self._reservations.remove(reservation)
            reservations.release(self._engine, reservation, now=self._clock())
