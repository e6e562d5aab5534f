"""Fast-Flow's `retry_strategy` objects, and the retry policy the executor gets from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from domain.tasks.registry import RetryPolicy


class Strict(BaseModel):
    """pipeline.json objects: unknown keys and loose types are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ExponentialBackoff(Strict):
    type: Literal["exponential_backoff"]
    initial_delay: float = Field(60.0, ge=0)
    max_delay: float = Field(3600.0, ge=0)
    multiplier: float = Field(2.0, ge=1)


class FixedDelay(Strict):
    type: Literal["fixed_delay"]
    delay: float = Field(60.0, ge=0)


class CustomSchedule(Strict):
    type: Literal["custom_schedule"]
    delays: list[Annotated[float, Field(ge=0)]] = Field(min_length=1)


RetryStrategy = Annotated[
    ExponentialBackoff | FixedDelay | CustomSchedule, Field(discriminator="type")
]


@dataclass(frozen=True)
class StrategyRetryPolicy(RetryPolicy):
    """A RetryPolicy that also knows Fast-Flow's strategies. `base_s`/`max_s` approximate the
    strategy for executors that only know exponential backoff; `delay_s` is exact."""

    strategy: str = "exponential_backoff"
    multiplier: float = 2.0
    delays: tuple[float, ...] = ()

    @classmethod
    def from_strategy(
        cls, strategy: ExponentialBackoff | FixedDelay | CustomSchedule | None
    ) -> StrategyRetryPolicy:
        if isinstance(strategy, ExponentialBackoff):
            return cls(strategy.initial_delay, strategy.max_delay, multiplier=strategy.multiplier)
        if isinstance(strategy, FixedDelay):
            return cls(strategy.delay, strategy.delay, strategy="fixed_delay", multiplier=1.0)
        if isinstance(strategy, CustomSchedule):
            delays = tuple(strategy.delays)
            return cls(delays[0], max(delays), strategy="custom_schedule", delays=delays)
        return cls()  # conveyor's default backoff (2 s doubling, capped at 300 s)

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1 = the first try) before the next."""
        retry = max(1, attempt)
        if self.strategy == "fixed_delay":
            return self.base_s
        if self.strategy == "custom_schedule":
            return self.delays[min(retry, len(self.delays)) - 1]
        return float(min(self.max_s, self.base_s * self.multiplier ** (retry - 1)))
