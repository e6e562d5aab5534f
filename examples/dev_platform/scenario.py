"""A project with a monthly token limit talks until the limit refuses more work."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from conveyor import Client
from domain.clock import utc_now
from domain.costs import projects
from domain.costs.ledger import MonthlyLimitReached
from domain.db.models import workers
from domain.db.unit_of_work import UnitOfWork


def run(client: Client, *, project: str = "acme", turns: int = 8) -> dict[str, Any]:
    # 5 words a message = 750 tokens a turn: a 3750-token month holds exactly five turns;
    # then the project is at its limit and the next turn is refused before it is queued.
    projects.add_project(UnitOfWork(client.engine), project, monthly_tokens=3750, now=utc_now())
    finished, refused_at = [], None
    for turn in range(turns):
        try:
            run = client.enqueue(
                "dev_platform.agent_turn",
                {
                    "conversation": "c-1",
                    "message": f"please add feature number {turn}",
                },
                project=project,
            )
        except MonthlyLimitReached as exc:
            refused_at = (turn, str(exc))
            break
        finished.append(client.wait(run.id, timeout=60))
    with client.engine.connect() as conn:
        agents = [dict(r) for r in conn.execute(select(workers)).mappings()]
    return {
        "runs": finished,
        "refused_at": refused_at,
        "agents": agents,
        "usage": projects.show_project(UnitOfWork(client.engine), project, now=utc_now()),
    }
