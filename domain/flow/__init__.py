"""Flow control: which runs may start now, shared by every worker.

concurrency.py: at most N runs per key at once (`@task(concurrency=Limit(...))`), the others
waiting without a worker and handed a slot as one frees.
rates.py: named limits in requests and tokens per minute (`@task(rate_limit=...)`,
`ctx.acquire`), counted per second in PostgreSQL, the same for every worker.
parking.py: how a gate makes a run wait at its claim, without holding a worker.
fair.py: a busy queue's runs published in turns between projects, by weight.
manage.py: what operators see of limits and change (`conveyor limits`, /api/v1/limits).
"""
