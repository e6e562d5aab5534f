"""`conveyor runs show` on runs a real executor finished: JSON values, one-line failure reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domain.db.engine import create_db_engine
from domain.errors import InvalidInput
from domain.security.secrets import SecretNotFound
from tests.e2e.test_cli import conveyor, ok
from tests.integration.conftest import harness


def finished_runs(db: str) -> dict[str, str]:
    """Run three tasks in an in-process worker on `db`; their run ids by what they did."""
    engine = create_db_engine(db)
    try:
        with harness(engine) as h:

            @h.registry.task(name="report")
            def report(ctx: Any, customer: str, tags: list[str]) -> dict[str, Any]:
                return {"customer": customer, "tags": tags, "ok": True, "note": None}

            @h.registry.task(name="needs_secret")
            def needs_secret(ctx: Any) -> None:
                raise SecretNotFound("no secret named 'OPENAI_API_KEY'")

            @h.registry.task(name="refuses")
            def refuses(ctx: Any, n: int) -> None:
                raise InvalidInput(f"n: expected at most 10, got {n}", field="n")

            ids = {
                "report": h.enqueue("report", params={"customer": "acme", "tags": ["[b]", "x"]}),
                "needs_secret": h.enqueue("needs_secret"),
                "refuses": h.enqueue("refuses", params={"n": 12}),
            }
            for run_id in ids.values():
                h.run(run_id)
    finally:
        engine.dispose()
    return {name: str(run_id) for name, run_id in ids.items()}


def test_show_prints_json_and_failure_reasons(sqlite_url: str, tmp_path: Path) -> None:
    ids = finished_runs(sqlite_url)

    shown = ok(conveyor("runs", "show", ids["report"], db=sqlite_url, cwd=tmp_path))
    assert '{"customer": "acme", "tags": ["[b]", "x"]}' in shown, shown  # JSON, markup kept
    assert '{"customer": "acme", "tags": ["[b]", "x"], "ok": true, "note": null}' in shown, shown
    assert "'customer'" not in shown and "True" not in shown  # not Python's repr

    for name, reason in [
        ("needs_secret", "SecretNotFound: no secret named 'OPENAI_API_KEY'"),
        ("refuses", "InvalidInput: n: expected at most 10, got 12"),
    ]:
        brief = ok(conveyor("runs", "show", ids[name], db=sqlite_url, cwd=tmp_path))
        error_lines = [line for line in brief.splitlines() if line.startswith("error")]
        assert len(error_lines) == 1 and error_lines[0].split(None, 1)[1].rstrip() == reason, brief
        assert "Traceback" not in brief and "--verbose" in brief

        verbose = ok(conveyor("runs", "show", ids[name], "--verbose", db=sqlite_url, cwd=tmp_path))
        assert reason in verbose
        assert "Traceback (most recent call last):" in verbose and "test_runs_show.py" in verbose

    as_json = json.loads(
        ok(conveyor("runs", "show", ids["refuses"], "--json", db=sqlite_url, cwd=tmp_path))
    )
    assert "Traceback (most recent call last):" in as_json["error"]  # programs get it all
