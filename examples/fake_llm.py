"""A deterministic stand-in for an LLM: token counts and prices follow from the prompt, so the
examples run offline and their numbers can be asserted exactly."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

PRICE_IN = Decimal("0.15") / 1_000_000  # USD per input token
PRICE_OUT = Decimal("0.60") / 1_000_000  # USD per output token


@dataclass(frozen=True)
class Reply:
    text: str
    tokens_in: int
    tokens_out: int

    @property
    def usd(self) -> Decimal:
        return self.tokens_in * PRICE_IN + self.tokens_out * PRICE_OUT


def complete(prompt: str, *, model: str = "fake-mini") -> Reply:
    """Echo-ish "completion": 100 tokens per prompt word in, 50 per word out."""
    words = prompt.split()
    return Reply(
        text=f"[{model}] " + " ".join(reversed(words)),
        tokens_in=100 * len(words),
        tokens_out=50 * len(words),
    )


def call(ctx, prompt: str, *, model: str = "fake-mini") -> Reply:  # type: ignore[no-untyped-def]
    """Reserve the worst case, call, record the actual cost: the pattern budgets rely on."""
    reply = complete(prompt, model=model)
    with ctx.reserve(usd=reply.usd, tokens=reply.tokens_in + reply.tokens_out):
        ctx.cost(
            provider="fake",
            model=model,
            tokens_in=reply.tokens_in,
            tokens_out=reply.tokens_out,
            usd=reply.usd,
        )
    return reply
