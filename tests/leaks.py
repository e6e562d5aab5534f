"""Looking for a secret in stored data: the forms it takes when printed, and every string a
database holds (each column of each table, JSON values walked), or a text such as a pg_dump."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

from sqlalchemy import Engine, MetaData, select


def secret_forms(secret: str) -> list[str]:
    """The texts a secret becomes in the serializations a pipeline is likely to print."""
    return [
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        quote(secret),
        quote(secret, safe=""),
        quote_plus(secret),
    ]


def found_in(text: str, secrets: Iterable[str]) -> list[str]:
    """The forms of `secrets` that occur in `text`."""
    return [form for s in secrets for form in secret_forms(s) if form in text]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif value is not None:
        yield str(value)


def stored_leaks(engine: Engine, secrets: Iterable[str]) -> list[tuple[str, str, str]]:
    """(table, column, form) for each form of a secret found in any column of any table, as
    the database returns it (JSON decoded and walked) and as its JSON text."""
    wanted = list(secrets)
    meta = MetaData()
    meta.reflect(engine)
    found = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)).mappings():
                for column, value in row.items():
                    texts = list(_strings(value))
                    if isinstance(value, dict | list):
                        texts.append(json.dumps(value))
                    for form in {f for t in texts for f in found_in(t, wanted)}:
                        found.append((table.name, str(column), form))
    return found


def copy_escaped(text: str) -> str:
    """`text` as pg_dump's COPY data writes it."""
    for char, escape in (("\\", "\\\\"), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        text = text.replace(char, escape)
    return text
