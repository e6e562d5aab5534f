"""Flow control: which runs may start now, shared by every worker.

concurrency.py: at most N runs per key at once (`@task(concurrency=Limit(...))`), the others
waiting without a worker and handed a slot as one frees.
"""
