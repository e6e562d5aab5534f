"""libpq_conninfo: the driver-level connection string says what the engine would connect with."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from domain.db.engine import libpq_conninfo


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg://ann:p%40ss%20word@127.0.0.1:5433/app"
            "?sslmode=require&options=-c%20TimeZone%3DUTC",
            {
                "host": "127.0.0.1",
                "port": "5433",
                "dbname": "app",
                "user": "ann",
                "password": "p@ss word",
                "sslmode": "require",
                "options": "-c TimeZone=UTC",
            },
        ),
        (
            "postgresql+psycopg://ann@/app?host=db1:5432&host=db2:6432",
            {"host": "db1,db2", "port": "5432,6432", "dbname": "app", "user": "ann"},
        ),
        ("postgresql+psycopg:///app?host=/var/run/postgresql", {"host": "/var/run/postgresql"}),
    ],
)
def test_the_urls_parts_reach_libpq_decoded(url: str, expected: dict[str, str]) -> None:
    got = conninfo_to_dict(libpq_conninfo(url))
    assert {k: got.get(k) for k in expected} == expected
    assert (got["application_name"], got["connect_timeout"]) == ("conveyor", "5")


def test_extra_arguments_win() -> None:
    got = conninfo_to_dict(libpq_conninfo("postgresql+psycopg://h/app", connect_timeout=2))
    assert got["connect_timeout"] == "2"
