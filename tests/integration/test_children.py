"""Child runs (`ctx.spawn`, `ctx.spawn_many`, `ctx.gather`) on a real executor and database:
children are made once per spawning step, the parent waits for them holding no worker, gets
their results in order or ChildFailed, and cancelling the parent cancels its children."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, update

from domain.clock import utc_now
from domain.db.models import Run, runs
from domain.db.unit_of_work import UnitOfWork
from domain.runs import control, gathering
from domain.runs.gathering import wake_gatherers
from tests.integration.conftest import Harness


def _children(h: Harness, parent: uuid.UUID) -> list[Any]:
    with h.engine.connect() as conn:
        return conn.execute(
            select(runs.c.id, runs.c.name, runs.c.status, runs.c.project, runs.c.triggered_by)
            .where(runs.c.parent_run_id == parent)
            .order_by(runs.c.created_at, runs.c.id)
        ).all()


def _run_all(h: Harness, ids: list[uuid.UUID]) -> None:
    for run_id in ids:
        assert h.run(run_id) in ("succeeded", "failed")


def _due(h: Harness, run_id: uuid.UUID) -> None:
    with h.engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(not_before=utc_now()))


def _tasks(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def square(ctx: Any, n: int) -> int:
        if n < 0:
            raise ValueError(f"{n} is negative")
        return n * n

    @h.registry.task(max_attempts=2, retry_backoff=3600.0)
    def fan_out(ctx: Any, numbers: list[int], fail_once: bool = False) -> list[int]:
        children = ctx.spawn_many({"name": "square", "params": {"n": n}} for n in numbers)
        one = ctx.spawn("square", {"n": 10})
        if ctx.attempt == 1 and fail_once:
            raise RuntimeError("crash after spawning")
        return [*ctx.gather(children), *ctx.gather([one])]


def test_a_parent_waits_for_its_children_and_gets_their_results_in_order(h: Harness) -> None:
    _tasks(h)
    parent = h.enqueue("fan_out", params={"numbers": [3, 1, 2]})
    assert h.run(parent) == "waiting"
    row = h.get(parent)
    assert (row.status, row.wait_reason) == ("waiting", "children")
    kids = _children(h, parent)
    assert [(k.name, k.status, k.project, k.triggered_by) for k in kids] == [
        ("square", "pending", "default", "spawn")
    ] * 4
    _run_all(h, [k.id for k in kids])
    _due(h, parent)
    assert h.run(parent) == "succeeded"
    assert h.get(parent).result == [9, 1, 4, 100]
    assert len(_children(h, parent)) == 4  # gathering again spawned nothing


def _wait_s(h: Harness, run_id: uuid.UUID) -> float:
    return (h.get(run_id).not_before - utc_now()).total_seconds()


def test_the_relay_wakes_a_gatherer_once_its_last_child_ended(h: Harness) -> None:
    """Gathering all its unfinished children, a parent does not poll: its wake time is only
    a net, and the sweep makes it due when (and not before) the last child ended."""

    @h.registry.task(max_attempts=1)
    def square(ctx: Any, n: int) -> int:
        return n * n

    @h.registry.task(max_attempts=1)
    def all_at_once(ctx: Any) -> list[int]:
        return ctx.gather(ctx.spawn_many({"name": "square", "params": {"n": n}} for n in (2, 3)))

    parent = h.enqueue("all_at_once")
    assert h.run(parent) == "waiting"
    assert gathering.GATHER_NET_S - 5 < _wait_s(h, parent) <= gathering.GATHER_NET_S
    kids = _children(h, parent)
    _run_all(h, [kids[0].id])
    assert wake_gatherers(h.engine, now=utc_now()) == 0  # one child is still pending
    _run_all(h, [kids[1].id])
    assert wake_gatherers(h.engine, now=utc_now()) == 1
    assert _wait_s(h, parent) <= 0 and h.get(parent).dispatched_at is None
    assert wake_gatherers(h.engine, now=utc_now()) == 0  # due already: not woken twice
    assert h.run(parent) == "succeeded"
    assert h.get(parent).result == [4, 9]


def test_a_gather_of_some_children_while_others_go_on_looks_again_each_second(
    h: Harness,
) -> None:
    _tasks(h)
    parent = h.enqueue("fan_out", params={"numbers": [1, 2]})
    assert h.run(parent) == "waiting"  # gathers two of its three children
    assert _wait_s(h, parent) <= gathering.GATHER_POLL_S


def test_a_replayed_spawn_makes_no_second_set_of_children(h: Harness) -> None:
    _tasks(h)
    parent = h.enqueue("fan_out", params={"numbers": [1, 2], "fail_once": True})
    assert h.run(parent) == "retrying"
    assert len(_children(h, parent)) == 3
    _due(h, parent)
    assert h.run(parent) == "waiting"  # the second attempt replays both spawns
    kids = _children(h, parent)
    assert len(kids) == 3
    _run_all(h, [k.id for k in kids])
    _due(h, parent)
    assert h.run(parent) == "succeeded"
    assert h.get(parent).result == [1, 4, 100]


def test_a_failed_child_is_named_once_all_have_ended(h: Harness) -> None:
    _tasks(h)
    parent = h.enqueue("fan_out", params={"numbers": [2, -1]})
    assert h.run(parent) == "waiting"
    kids = _children(h, parent)
    _run_all(h, [kids[0].id])
    _due(h, parent)
    assert h.run(parent) == "waiting"  # one child is still pending
    _run_all(h, [k.id for k in kids[1:]])
    _due(h, parent)
    assert h.run(parent) == "retrying"  # ChildFailed is an ordinary failure of the attempt
    run = h.get(parent)
    assert run.error_type == "ChildFailed"
    assert f"1 of 2 children did not succeed: {kids[1].id} (square: failed, ValueError)" in str(
        run.error
    )


def test_cancelling_a_waiting_parent_cancels_its_unfinished_children(h: Harness) -> None:
    _tasks(h)
    parent = h.enqueue("fan_out", params={"numbers": [1, 2]})
    assert h.run(parent) == "waiting"
    kids = _children(h, parent)
    assert h.run(kids[0].id) == "succeeded"
    control.cancel_run(UnitOfWork(h.engine), parent, actor="test")
    statuses = {k.id: k.status for k in _children(h, parent)}
    assert h.get(parent).status == "cancelled"
    assert statuses[kids[0].id] == "succeeded"  # an ended child stays as it ended
    assert sorted(statuses[k.id] for k in kids[1:]) == ["cancelled", "cancelled"]
    with h.engine.connect() as conn:
        why = conn.execute(
            select(func.min(runs.c.error)).where(runs.c.id == kids[1].id)
        ).scalar_one()
    assert why == f"its parent run {parent} was cancelled"


def test_a_childs_spend_counts_toward_its_parents_budget(h: Harness) -> None:
    @h.registry.task(max_attempts=1)
    def spender(ctx: Any, usd: str) -> None:
        ctx.cost("llm", "small", tokens_in=1, usd=usd)

    @h.registry.task(max_attempts=1)
    def manager(ctx: Any) -> list[Any]:
        kids = ctx.spawn_many({"name": "spender", "params": {"usd": "0.40"}} for _ in range(4))
        return ctx.gather(kids)

    parent = h.enqueue("manager", budget_usd="1.00")
    assert h.run(parent) == "waiting"
    kids = [k.id for k in _children(h, parent)]
    assert [h.run(k) for k in kids[:2]] == ["succeeded", "succeeded"]
    assert h.get(parent).cost_usd == Decimal("0.80")  # its children's 0.40 + 0.40
    # The third child spends past the parent's budget: it stops, as a run over its own would.
    assert h.run(kids[2]) == "budget_exceeded"
    child = h.get(kids[2])
    assert f"parent run {parent} budget_usd 1 exceeded by 0.2 " in str(child.error)
    assert h.get(parent).cost_usd == Decimal("1.20")
    # and a child not started yet does not start: its parent has spent its budget
    assert h.run(kids[3]) == "budget_exceeded"
    assert h.get(kids[3]).started_at is None
