"""The dashboard on PostgreSQL, as a browser uses it: log in with an API token, read the
overview, the runs list and a run, cancel and retry through forms that carry a CSRF token."""

from __future__ import annotations

import html
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from api.dashboard.session import safe_next
from domain.db.models import audit_logs, runs
from tests.api.conftest import (
    ApiClient,
    add_logs,
    add_records,
    create_run,
    running_api,
    set_status,
)
from tests.api.pages import csrf_of, is_local, table, urls_in
from tests.runs_seed import insert_run, insert_worker

pytestmark = pytest.mark.postgres


@contextmanager
def browser(api: ApiClient, role: str | None = None, ip: str = "127.0.0.1") -> Iterator[ApiClient]:
    """A client with a cookie jar of its own, logged in with the `role` token if given."""
    with api.from_address(ip) as client:
        if role is not None:
            login = client.get("/login")
            response = client.post(
                "/login",
                data={"csrf_token": csrf_of(login.text), "token": api.tokens[role], "next": "/"},
            )
            assert response.status_code == 303, response.text
        yield client


def status_of(api: ApiClient, run_id: str | uuid.UUID) -> str:
    with api.state.engine.connect() as conn:
        found = conn.execute(select(runs.c.status).where(runs.c.id == uuid.UUID(str(run_id))))
        return str(found.scalar_one())


def test_pages_ask_for_a_login_and_keep_the_token_in_a_strict_httponly_cookie(
    pg_api: ApiClient,
) -> None:
    with browser(pg_api) as anonymous:
        first = anonymous.get("/runs?name=x")
        assert first.status_code == 303
        assert first.headers["location"] == "/login?next=/runs%3Fname%3Dx"
        page = anonymous.get(first.headers["location"])
        assert page.status_code == 200 and 'name="token"' in page.text
        assert "HttpOnly" in page.headers["set-cookie"]  # the CSRF key, before any login

        wrong = anonymous.post(
            "/login", data={"csrf_token": csrf_of(page.text), "token": "cvy_nope", "next": "/runs"}
        )
        assert wrong.status_code == 401
        assert "invalid or revoked API token" in wrong.text
        assert "conveyor_session" not in wrong.headers.get("set-cookie", "")

        assert 'name="next" value="/runs?name=x"' in page.text
        right = anonymous.post(
            "/login",
            data={
                "csrf_token": csrf_of(page.text),
                "token": pg_api.tokens["readonly"],
                "next": "/runs?name=x",
            },
        )
        assert right.status_code == 303 and right.headers["location"] == "/runs?name=x"
        cookie = right.headers["set-cookie"]
        assert cookie.startswith("conveyor_session=cvy_")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert anonymous.get("/").status_code == 200

        # A token revoked since: back to the login page, the stale cookie dropped.
        pg_api.as_role("admin", "DELETE", "/api/v1/tokens/readonly-token")
        again = anonymous.get("/")
        assert again.status_code == 303 and again.headers["location"].startswith("/login")
        assert 'conveyor_session=""' in again.headers["set-cookie"]


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/", "//evil.example/", "/\\evil.example", "/\t/evil.example", "runs", ""],
)
def test_after_login_only_paths_on_this_server_are_followed(target: str) -> None:
    assert safe_next(target) == "/"
    assert safe_next("/runs/1?status=failed") == "/runs/1?status=failed"


def test_overview_counts_match_the_seeded_runs(pg_api: ApiClient) -> None:
    engine = pg_api.state.engine
    now = datetime.now(UTC)
    for status in ["pending", "pending", "running", "waiting"]:
        insert_run(engine, queue="default", status=status, created_at=now - timedelta(minutes=1))
    insert_run(engine, queue="default", created_at=now - timedelta(minutes=7, seconds=3))
    insert_run(engine, queue="gpu", status="waiting", created_at=now - timedelta(seconds=30))
    insert_run(engine, queue="ended-only", status="succeeded")
    ended = (now - timedelta(minutes=5)).replace(second=10)
    for status in ["succeeded", "failed", "succeeded"]:
        insert_run(engine, status=status, created_at=ended, finished_at=ended)
    insert_worker(engine, "w-ok", silent_s=1)
    insert_worker(engine, "w-dead", silent_s=300)
    stuck = insert_run(
        engine,
        queue="gpu",
        status="running",
        attempt=1,
        lease_owner="w-dead",
        lease_expires_at=now - timedelta(minutes=2),
    )

    with browser(pg_api, "readonly") as reader:
        html = reader.get("/").text

    queues = {attrs["data-queue"]: cells for attrs, cells in table(html, "queues")}
    assert set(queues) == {"default", "gpu"}
    assert queues["default"][1:4] == ["3", "1", "1"]  # pending, running, waiting
    assert queues["default"][4] == "7m 03s"  # the oldest queued, not the running one
    assert queues["gpu"][1:4] == ["0", "1", "1"]
    assert f"{ended:%H:%M}: 3 ended, 1 failed" in html
    assert html.count('class="ended"') == 60
    workers = {
        attrs["data-worker"]: (attrs["class"], cells) for attrs, cells in table(html, "workers")
    }
    assert workers["w-ok"][0] == "" and workers["w-ok"][1][-1] == "alive"
    assert workers["w-dead"][0] == "dead" and "lost (dead)" in workers["w-dead"][1][-1]
    [stuck_row] = table(html, "stuck")
    assert f'href="/runs/{stuck}"' in html and stuck_row[1][1:4] == ["report", "gpu", "w-dead"]


def test_runs_list_filters_and_pages_by_keyset(pg_api: ApiClient) -> None:
    engine = pg_api.state.engine
    now = datetime.now(UTC)
    wanted = insert_run(engine, "embed", queue="gpu", status="failed", project="default")
    insert_run(engine, "embed", queue="default", status="failed")  # other queue
    insert_run(engine, "embed", queue="gpu", status="succeeded")  # other status
    insert_run(engine, "report", queue="gpu", status="failed")  # other name
    older = [
        insert_run(engine, "bulk", created_at=now - timedelta(seconds=i)) for i in range(1, 56)
    ]

    with browser(pg_api, "readonly") as reader:
        page = reader.get("/runs", params={"status": "failed", "name": "embed", "queue": "gpu"})
        assert page.status_code == 200
        assert [attrs["data-run"] for attrs, _ in table(page.text, "runs")] == [str(wanted)]
        assert 'rel="next"' not in page.text

        first = reader.get("/runs", params={"name": "bulk", "project": "default", "queue": ""})
        shown = [attrs["data-run"] for attrs, _ in table(first.text, "runs")]
        assert shown == [str(run_id) for run_id in older[:50]]  # newest first
        [link] = [url for url in urls_in(first.text) if "cursor=" in url]
        assert "offset" not in link and "name=bulk" in link and "project=default" in link
        second = reader.get(link.replace("&amp;", "&"))
        rest = [attrs["data-run"] for attrs, _ in table(second.text, "runs")]
        assert rest == [str(run_id) for run_id in older[50:]]
        assert 'rel="next"' not in second.text  # the last page
        assert 'href="/runs?name=bulk&amp;project=default">← Newest' in second.text

        bad = reader.get("/runs?status=bogus")
        assert bad.status_code == 422 and "unknown status" in bad.text


def test_readonly_sees_no_action_buttons_and_cannot_post_them(pg_api: ApiClient) -> None:
    pending = create_run(pg_api)["id"]
    ended = create_run(pg_api)["id"]
    set_status(pg_api.state.engine, ended, "failed")

    with browser(pg_api, "readonly") as reader, browser(pg_api, "write") as writer:
        for run_id in (pending, ended):
            html = reader.get(f"/runs/{run_id}").text
            assert "/cancel" not in html and "/retry" not in html
            assert "<button" in html  # only the log-out one
        assert f'action="/runs/{pending}/cancel"' in writer.get(f"/runs/{pending}").text
        assert f'action="/runs/{ended}/retry"' in writer.get(f"/runs/{ended}").text

        token = csrf_of(reader.get(f"/runs/{pending}").text)
        refused = reader.post(f"/runs/{pending}/cancel", data={"csrf_token": token})
        assert refused.status_code == 403 and "needs write" in refused.text
    assert status_of(pg_api, pending) == "pending"


def test_a_post_without_this_sessions_csrf_token_is_refused(pg_api: ApiClient) -> None:
    run_id = create_run(pg_api)["id"]
    with browser(pg_api, "write") as writer, browser(pg_api, "admin") as other:
        writer.get(f"/runs/{run_id}")
        foreign = csrf_of(other.get(f"/runs/{run_id}").text)
        for data in [{}, {"csrf_token": ""}, {"csrf_token": "0" * 64}, {"csrf_token": foreign}]:
            response = writer.post(f"/runs/{run_id}/cancel", data=data)
            assert response.status_code == 403, data
            assert "did not come from this dashboard" in response.text
        assert writer.post(f"/runs/{run_id}/retry", data={}).status_code == 403
        assert writer.post("/logout", data={}).status_code == 403

        # Same browser, new session (logged in again as another token): the old form's token
        # was bound to the old session and is refused.
        stale = csrf_of(writer.get(f"/runs/{run_id}").text)
        relogin = writer.post(
            "/login", data={"csrf_token": stale, "token": pg_api.tokens["admin"], "next": "/"}
        )
        assert relogin.status_code == 303
        refused = writer.post(f"/runs/{run_id}/cancel", data={"csrf_token": stale})
        assert refused.status_code == 403
    assert status_of(pg_api, run_id) == "pending"


def test_cancel_through_the_page_cancels_exactly_that_run(pg_api: ApiClient) -> None:
    target = create_run(pg_api)["id"]
    bystander = create_run(pg_api)["id"]
    with browser(pg_api, "write") as writer:
        token = csrf_of(writer.get(f"/runs/{target}").text)
        response = writer.post(f"/runs/{target}/cancel", data={"csrf_token": token})
        assert response.status_code == 303 and response.headers["location"] == f"/runs/{target}"
        after = writer.get(f"/runs/{target}").text
        assert "s-cancelled" in after and "/cancel" not in after
        again = writer.post(f"/runs/{target}/cancel", data={"csrf_token": token})
        assert again.status_code == 409
    assert (status_of(pg_api, target), status_of(pg_api, bystander)) == ("cancelled", "pending")
    with pg_api.state.engine.connect() as conn:
        audit = conn.execute(
            select(audit_logs.c.actor, audit_logs.c.target_id).where(
                audit_logs.c.action == "run.cancel"
            )
        ).all()
    assert [(actor, target_id) for actor, target_id in audit] == [("write-token", target)]


def test_retry_through_the_page_links_parent_and_child(pg_api: ApiClient) -> None:
    parent = create_run(pg_api)["id"]
    set_status(pg_api.state.engine, parent, "failed", error_type="ValueError", error="bad row 7")
    with browser(pg_api, "write") as writer:
        token = csrf_of(writer.get(f"/runs/{parent}").text)
        response = writer.post(f"/runs/{parent}/retry", data={"csrf_token": token})
        assert response.status_code == 303
        child = response.headers["location"].removeprefix("/runs/")
        assert child != parent and status_of(pg_api, child) == "pending"
        child_page = writer.get(f"/runs/{child}").text
        assert f'href="/runs/{parent}"' in child_page  # its parent
        parent_page = writer.get(f"/runs/{parent}").text
        assert [cells[0] for _, cells in table(parent_page, "children")] == [child[:12] + "…"]
        assert "ValueError" in parent_page and "bad row 7" in parent_page


def test_run_detail_masks_secrets_and_shows_the_last_log_lines(pg_api: ApiClient) -> None:
    run_id = create_run(
        pg_api, params={"api_key": "sk-live-123", "nested": {"password": "hunter2"}, "n": 7}
    )["id"]
    add_logs(pg_api.state.engine, run_id, range(1, 251))
    add_records(pg_api.state.engine, run_id)
    with browser(pg_api, "readonly") as reader:
        html = reader.get(f"/runs/{run_id}").text
        steps = [cells[1:4] for _, cells in table(html, "steps")]
        assert steps == [["fetch", "step", "completed"], ["llm", "step", "running"]]
        # Summed per model, exactly.
        assert [cells for _, cells in table(html, "costs")] == [
            ["openai", "gpt-4o-mini", "1800", "160", "2", "0.0004"]
        ]
        assert "sk-live-123" not in html and "hunter2" not in html
        assert "&#34;api_key&#34;: &#34;***&#34;" in html and "&#34;n&#34;: 7" in html
        assert "The last 200 of 250 lines" in html
        assert 'data-seq="51"' in html and 'data-seq="250"' in html
        assert 'data-seq="50"' not in html
        # Not ended: the page follows the log over the session's own stream.
        assert f'data-stream="/runs/{run_id}/logs/stream?after_seq=250"' in html

        set_status(pg_api.state.engine, run_id, "succeeded")
        add_logs(pg_api.state.engine, run_id, range(251, 253))
        stream = reader.get(f"/runs/{run_id}/logs/stream?after_seq=250")
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "id: 251" in stream.text and "id: 252" in stream.text
        assert '"status": "succeeded"' in stream.text
        assert "id: 250" not in stream.text
    with browser(pg_api) as anonymous:
        assert anonymous.get(f"/runs/{run_id}/logs/stream").status_code == 303


def test_the_api_shows_a_runs_params_masked_as_the_page_does(pg_api: ApiClient) -> None:
    secret = {"api_key": "sk-live-123", "nested": {"password": "hunter2"}, "n": 7}
    created = create_run(pg_api, params=secret)
    run_id = created["id"]
    set_status(pg_api.state.engine, run_id, "succeeded", result={"token": "t0k", "rows": 3})
    expected = {"api_key": "***", "nested": {"password": "***"}, "n": 7}
    assert created["params"] == expected  # the create answer too
    detail = pg_api.as_role("readonly", "GET", f"/api/v1/runs/{run_id}").json()
    [listed] = pg_api.as_role("readonly", "GET", "/api/v1/runs").json()["items"]
    assert detail["params"] == listed["params"] == expected
    assert detail["result"] == listed["result"] == {"token": "***", "rows": 3}
    with browser(pg_api, "readonly") as reader:
        page = reader.get(f"/runs/{run_id}").text
    shown = html.unescape(page.split('<pre id="params">')[1].split("</pre>")[0])
    assert json.loads(shown) == detail["params"]
    # Stored as sent: the worker gets the real values.
    with pg_api.state.engine.connect() as conn:
        stored = conn.execute(select(runs.c.params).where(runs.c.id == uuid.UUID(run_id)))
        assert stored.scalar_one() == secret


def test_no_page_references_a_url_off_this_server(pg_api: ApiClient) -> None:
    parent = create_run(pg_api, params={"see": "https://example.org/in-params"})["id"]
    set_status(pg_api.state.engine, parent, "failed", error="see https://example.org/help")
    add_logs(pg_api.state.engine, parent, range(1, 3))
    insert_worker(pg_api.state.engine, "w-1", silent_s=1)
    with browser(pg_api) as anonymous:
        pages = {"/login": anonymous.get("/login").text}
    with browser(pg_api, "admin") as admin:
        for path in ["/", "/runs", f"/runs/{parent}", f"/runs/{uuid.uuid4()}", "/runs?status=x"]:
            pages[path] = admin.get(path).text
        assets: set[str] = set()
        for path, html in pages.items():
            urls = urls_in(html)
            assert urls, path
            assert [url for url in urls if not is_local(url)] == [], path
            assets |= {url for url in urls if url.startswith("/static/")}
        assert {"/static/dashboard/dashboard.css", "/static/dashboard/dashboard.js"} <= assets
        for url in sorted(assets):
            response = admin.get(url)
            assert response.status_code == 200 and response.content, url
        # Text that names other sites is shown as text, never as a link or a resource.
        assert "https://example.org/help" in pages[f"/runs/{parent}"]
        css = admin.get("/static/dashboard/dashboard.css").text
        assert "@import" not in css and "url(" not in css and "http" not in css


def test_pages_send_a_policy_that_keeps_the_browser_on_this_server(pg_api: ApiClient) -> None:
    with browser(pg_api, "readonly") as reader:
        response = reader.get("/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy


def test_without_auth_local_callers_need_no_login_and_others_are_refused(pg_url: str) -> None:
    with running_api(pg_url, auth_disabled=True) as api:
        run_id = create_run(api)["id"]
        with browser(api) as local:
            assert local.get("/login").headers["location"] == "/"
            page = local.get(f"/runs/{run_id}")
            assert page.status_code == 200 and "dev · admin" in page.text
            assert "Log out" not in page.text
            cancel = local.post(f"/runs/{run_id}/cancel", data={"csrf_token": csrf_of(page.text)})
            assert cancel.status_code == 303
            assert local.post(f"/runs/{run_id}/retry", data={}).status_code == 403
        with browser(api, ip="10.1.2.3") as remote:
            refused = remote.get("/")
            assert refused.status_code == 403 and "only local clients" in refused.text
        assert status_of(api, run_id) == "cancelled"
