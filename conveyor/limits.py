"""Rate limits shared by all workers: `limits.define("openai", requests_per_minute=500,
tokens_per_minute=200_000)` beside the tasks that use them (`@task(rate_limit="openai")`,
`ctx.acquire("openai", tokens=...)`). See domain/flow/rates.py for how they are kept."""

from domain.flow.rates import RateLimit, define

__all__ = ["RateLimit", "define"]
