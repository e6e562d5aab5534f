"""Sweep cursors: where an incremental sweep (rollups, outbound discovery, the leader's beat)
stopped last time, one `sweep_cursors` row per sweep, read and moved in the sweep's own
transaction."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import Connection, Table, select

from domain.db import sql
from domain.db.models_platform import SweepCursor

cursors = cast(Table, SweepCursor.__table__)


def read(conn: Connection, name: str) -> datetime | None:
    """Where the sweep `name` stopped last time, if it ever ran."""
    return conn.execute(select(cursors.c.position).where(cursors.c.name == name)).scalar()


def read_at(conn: Connection, name: str) -> tuple[datetime, datetime] | None:
    """Where the sweep `name` stopped last time and when it recorded that, if it ever ran."""
    row = conn.execute(
        select(cursors.c.position, cursors.c.updated_at).where(cursors.c.name == name)
    ).first()
    return None if row is None or row.position is None else (row.position, row.updated_at)


def move(conn: Connection, name: str, position: datetime, now: datetime) -> None:
    """Record that the sweep `name` has reached `position` (as of `now`)."""
    conn.execute(
        sql.insert(conn, cursors)
        .values(name=name, position=position, updated_at=now)
        .on_conflict_do_update(
            index_elements=["name"], set_={"position": position, "updated_at": now}
        )
    )
