"""Chains (issue 8): one follow-up per parent outcome, `after=` waits, bad chains refused."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from domain.clock import utc_now
from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.errors import ConfigurationError, RunNotFound
from domain.runs import dispatch, enqueue
from domain.runs.chains import check_chains, release_after
from domain.runs.requests import build_request
from domain.tasks.registry import Registry
from tests.integration.conftest import Harness


def children(h: Harness, parent: object) -> list[dict[str, object]]:
    with h.engine.connect() as conn:
        return [
            dict(r)
            for r in conn.execute(select(runs).where(runs.c.parent_run_id == parent)).mappings()
        ]


def test_on_success_passes_the_result_and_on_failure_the_error(h: Harness) -> None:
    @h.registry.task(on_success="review")
    def draft(ctx, card: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
        return {"card": card, "text": f"draft of {card}", "ignored": "x"}

    @h.registry.task(on_failure="alert")
    def review(ctx, card: str, text: str) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError(f"review of {card} failed")

    @h.registry.task()
    def alert(ctx, run_id: str, error_type: str) -> None:  # type: ignore[no-untyped-def]
        pass

    check_chains(h.registry)
    parent = h.enqueue("draft", params={"card": "C-1"})
    assert h.run(parent) == "succeeded"
    [child] = children(h, parent)
    assert (child["name"], child["triggered_by"], child["params"]) == (
        "review",
        "chain",
        {"card": "C-1", "text": "draft of C-1"},
    )
    assert h.run(child["id"]) == "failed"
    [handler] = children(h, child["id"])
    assert handler["name"] == "alert"
    assert handler["params"] == {"run_id": str(child["id"]), "error_type": "RuntimeError"}


def test_a_follow_up_is_made_once_even_if_the_final_write_is_retried(h: Harness) -> None:
    @h.registry.task(on_success="next_step")
    def first(ctx) -> dict[str, int]:  # type: ignore[no-untyped-def]
        return {"n": 1}

    @h.registry.task()
    def next_step(ctx, n: int) -> None:  # type: ignore[no-untyped-def]
        pass

    parent = h.enqueue("first")
    assert h.run(parent) == "succeeded"
    from domain.runs.chains import chain_follow_up

    claim = type("C", (), {"run_id": parent, "name": "first", "kind": "task", "project": "default"})
    with h.engine.begin() as conn:  # the same outcome recorded again (a retried transaction)
        again = chain_follow_up(
            conn,
            h.registry,
            parent=claim,
            status="succeeded",
            result={"n": 1},
            error_type=None,
            error=None,
            now=utc_now(),
        )
    assert again is None
    assert len(children(h, parent)) == 1


def test_unknown_targets_and_cycles_are_refused() -> None:
    registry = Registry()

    @registry.task(on_success="b")
    def a(ctx) -> None:  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(ConfigurationError, match="chains to 'b', which is not a registered task"):
        check_chains(registry)

    @registry.task(on_success="c")
    def b(ctx) -> None:  # type: ignore[no-untyped-def]
        pass

    @registry.task(on_success="a")
    def c(ctx) -> None:  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(ConfigurationError, match="chain cycle: a -> b -> c -> a"):
        check_chains(registry)


def test_after_waits_for_the_parent(h: Harness) -> None:
    @h.registry.task()
    def step(ctx, fail: bool = False) -> None:  # type: ignore[no-untyped-def]
        if fail:
            raise ValueError("no")

    uow = UnitOfWork(h.engine)
    ok_parent = h.enqueue("step")
    bad_parent = h.enqueue("step", params={"fail": True})
    waits_ok = enqueue.enqueue(uow, build_request(name="step"), after=ok_parent).run.id
    waits_bad = enqueue.enqueue(uow, build_request(name="step"), after=bad_parent).run.id
    with pytest.raises(RunNotFound):
        enqueue.enqueue(uow, build_request(name="step"), after=waits_ok.__class__(int=1))
    assert release_after(h.engine, now=utc_now()) == (0, 0)  # parents still pending
    assert h.run(waits_ok) == "dropped"  # held: not due
    assert (h.run(ok_parent), h.run(bad_parent)) == ("succeeded", "failed")
    assert release_after(h.engine, now=utc_now()) == (1, 1)
    assert h.get(waits_bad).status == "cancelled"
    assert "ended as failed" in (h.get(waits_bad).error or "")
    with h.engine.connect() as conn:
        due = {d[0] for d in dispatch.due_for_dispatch(conn, now=utc_now(), grace_s=30)}
    assert waits_ok in due
    assert h.run(waits_ok) == "succeeded"
    with h.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(runs)).scalar_one() == 4
