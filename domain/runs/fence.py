"""The attempt fence: a write to a run counts only while that attempt still owns it."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import and_

from domain.db.models import runs
from domain.runs.states import Status


def owned(run_id: uuid.UUID, attempt: int) -> Any:
    return and_(runs.c.id == run_id, runs.c.attempt == attempt, runs.c.status == Status.RUNNING)
