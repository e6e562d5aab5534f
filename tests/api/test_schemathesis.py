"""schemathesis against /openapi.json: every operation, fuzzed with an admin token, never
answers with a server error. Bounded (a few examples per operation) to stay well under a minute.

Cases come from schemathesis's hypothesis strategies (`operation.as_strategy()`), not from its
pytest plugin: the plugin's fixture loader reads a pytest internal that pytest 9 removed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from sqlalchemy import Engine

from api.app import create_api
from domain.clock import utc_now
from domain.db.engine import create_db_engine
from domain.db.unit_of_work import UnitOfWork
from domain.ports import OpenCatalog
from domain.schedules import leader as leader_heartbeat
from domain.security import tokens as auth
from domain.settings import load_settings
from tests.api.conftest import SECRET_KEY
from tests.conftest import _truncate_pg
from tests.fakes import FakePublisher

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

MAX_EXAMPLES = 6


def _operations() -> list[str]:
    """Every operation's label ("GET /api/v1/runs"), from an app that connects to nothing."""
    app = create_api(load_settings(database_url="sqlite://", broker_url="memory://"))
    schema = schemathesis.openapi.from_dict(app.openapi())
    return sorted(result.ok().label for result in schema.get_all_operations())


class Fuzzed:
    def __init__(self, schema: Any, engine: Engine, token: str) -> None:
        self.schema, self.engine, self.token = schema, engine, token

    def operation(self, label: str) -> Any:
        method, path = label.split(" ", 1)
        return self.schema[path][method]


@pytest.fixture(scope="module")
def fuzzed(pg_database: str) -> Iterator[Fuzzed]:
    _truncate_pg(pg_database)
    engine = create_db_engine(pg_database)
    app = create_api(
        load_settings(database_url=pg_database, broker_url="memory://"),
        engine=engine,
        publisher=FakePublisher(),
        catalog=OpenCatalog(),
        secret_key=SECRET_KEY,
    )
    _, token = auth.create_token(UnitOfWork(engine), "fuzzer", "admin", actor="test")
    try:
        yield Fuzzed(schemathesis.openapi.from_asgi("/openapi.json", app), engine, token)
    finally:
        engine.dispose()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", _operations())
def test_no_operation_answers_with_a_server_error(
    fuzzed: Fuzzed, label: str, mode: GenerationMode
) -> None:
    """Positive cases fit the schema; negative ones break it (wrong types, missing fields,
    out-of-range values), which the API must refuse with a 4xx."""
    headers = {"Authorization": f"Bearer {fuzzed.token}"}

    @given(case=fuzzed.operation(label).as_strategy(mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        # A scheduler leads (as in any healthy deployment), so /readyz may answer 200.
        leader_heartbeat.beat(fuzzed.engine, now=utc_now())
        case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=10)

    try:
        check()
    except Unsatisfiable:
        # An operation with nothing to get wrong (no parameters, no body) has no negative case.
        assert mode is GenerationMode.NEGATIVE
