"""Bearer tokens with roles: 401 for missing/invalid/revoked, 403 for a role too low, failed
attempts slowed then blocked per address and per token prefix (never a token that
authenticates), last_used_at written sparingly."""

from __future__ import annotations

from sqlalchemy import select
from structlog.testing import capture_logs

from api.auth import FailedAuthLimiter, TokenCache
from api.options import ApiOptions
from domain.security import tokens as auth
from domain.security.tokens import api_tokens
from tests.api.conftest import ApiClient, create_run, error_of, running_api

RUNS = "/api/v1/runs"


def test_missing_invalid_and_revoked_tokens_are_401(api: ApiClient) -> None:
    for headers in [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer cvy_not-a-real-token"},
        {"Authorization": "Bearer " + "x" * 10_000},
    ]:
        response = api.get(RUNS, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert error_of(response)["type"] == "unauthorized"


def test_a_token_revoked_elsewhere_is_refused_once_the_cache_entry_expires(
    api: ApiClient,
) -> None:
    now = [0.0]
    api.app.state.tokens.clock = lambda: now[0]
    token = api.tokens["readonly"]
    assert api.get(RUNS, token=token).status_code == 200
    auth.revoke_token(api.uow(), "readonly-token", actor="test")  # as the CLI would
    # Trusted for token_cache_s after it last reached the database, and not a moment more.
    now[0] += api.state.options.token_cache_s - 0.001
    assert api.get(RUNS, token=token).status_code == 200
    now[0] += 0.001
    revoked = api.get(RUNS, token=token)
    assert revoked.status_code == 401 and "revoked" in error_of(revoked)["message"]


def test_a_token_revoked_through_the_api_is_refused_at_once(api: ApiClient) -> None:
    token = api.tokens["readonly"]
    assert api.get(RUNS, token=token).status_code == 200
    assert api.as_role("admin", "DELETE", "/api/v1/tokens/readonly-token").status_code == 200
    revoked = api.get(RUNS, token=token)
    assert revoked.status_code == 401 and "revoked" in error_of(revoked)["message"]


def test_token_cache_keeps_successes_by_hash_for_ttl_only() -> None:
    now = [0.0]
    cache = TokenCache(2.0, clock=lambda: now[0], max_entries=2)
    who = auth.Principal(name="ci", role="write")
    cache.put("h1", who)
    assert cache.get("h1") == who and cache.get("h2") is None
    now[0] = 1.999
    assert cache.get("h1") == who
    now[0] = 2.0
    assert cache.get("h1") is None
    cache.put("h1", who)
    cache.put("h2", who)
    cache.put("h3", who)  # over max_entries: starts over rather than growing
    assert cache.get("h1") is None and cache.get("h3") == who
    off = TokenCache(0.0)
    off.put("h1", who)
    assert off.get("h1") is None


def test_roles_readonly_reads_write_changes_admin_manages(api: ApiClient) -> None:
    run_id = create_run(api)["id"]
    cancel = f"{RUNS}/{run_id}/cancel"
    denied = api.as_role("readonly", "POST", cancel)
    assert denied.status_code == 403
    assert error_of(denied)["type"] == "forbidden" and "needs write" in error_of(denied)["message"]
    assert api.as_role("readonly", "POST", RUNS, json={"name": "t"}).status_code == 403
    assert api.as_role("readonly", "GET", f"{RUNS}/{run_id}").status_code == 200
    assert api.as_role("write", "GET", "/api/v1/audit").status_code == 403
    assert api.as_role("write", "GET", "/api/v1/tokens").status_code == 403
    assert api.as_role("write", "POST", cancel).status_code == 200
    assert api.as_role("admin", "GET", "/api/v1/audit").status_code == 200
    # The run is untouched by the refused calls: one cancel, by the write token.
    entries = api.as_role("admin", "GET", "/api/v1/audit?action=run.cancel").json()["items"]
    assert [e["actor"] for e in entries] == ["write-token"]


def test_probes_and_docs_need_no_token(api: ApiClient) -> None:
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"]:
        assert api.get(path).status_code == 200, path


def test_repeated_failures_are_slowed_then_blocked_but_valid_tokens_still_work(
    db_url: str,
) -> None:
    options = ApiOptions(
        auth_slow_after=1, auth_block_after=3, auth_max_delay_s=0.01, auth_block_s=600
    )
    with running_api(db_url, options=options) as api, api.from_address("10.0.0.9") as attacker:
        with capture_logs() as events:
            for n in range(3):
                assert attacker.get(RUNS, token=f"cvy_guess{n}-xyz").status_code == 401
            blocked = attacker.get(RUNS, token="cvy_guess4-xyz")
        assert blocked.status_code == 429
        assert error_of(blocked)["type"] == "rate_limited"
        assert "from this address" in error_of(blocked)["message"]
        assert 0 < int(blocked.headers["retry-after"]) <= 600
        names = [e["event"] for e in events if e["log_level"] == "warning"]
        assert names == ["auth.slowed", "auth.blocked"]
        assert events[-1]["ip"] == "10.0.0.9" and events[-1]["blocked"] == ["address"]
        # A token that authenticates is served from the blocked address, every time, and
        # does not wipe the count of the guesses made there.
        for _ in range(3):
            assert attacker.get(RUNS, token=api.tokens["admin"]).status_code == 200
        assert attacker.get(RUNS, token="cvy_guess5-xyz").status_code == 429
        assert attacker.get(RUNS).status_code == 429  # no token at all is a failure too
        # Another address is not affected.
        assert api.get(RUNS, token="cvy_typo-once").status_code == 401
        assert api.get(RUNS, token=api.tokens["readonly"]).status_code == 200


def test_guesses_at_one_token_are_counted_across_addresses(db_url: str) -> None:
    options = ApiOptions(auth_slow_after=10, auth_block_after=3, auth_block_s=600)
    leaked = "cvy_Leaked12"  # the same first 12 characters, whatever follows
    with running_api(db_url, options=options) as api:
        for n in range(3):
            with api.from_address(f"198.51.100.{n}") as guesser:
                assert guesser.get(RUNS, token=f"{leaked}-guess-{n}").status_code == 401
        with api.from_address("198.51.100.77") as fresh:
            refused = fresh.get(RUNS, token=f"{leaked}-guess-77")
            assert refused.status_code == 429, refused.text
            assert "with this token" in error_of(refused)["message"]
            assert fresh.get(RUNS, token="cvy_another-one").status_code == 401
            assert fresh.get(RUNS, token=api.tokens["write"]).status_code == 200
        assert "Leaked12" not in repr(api.app.state.limiter.__dict__)  # only a hash is kept


def test_the_block_expires_and_the_window_slides() -> None:
    now = [0.0]
    options = ApiOptions(auth_slow_after=2, auth_block_after=4, auth_window_s=60, auth_block_s=30)
    limiter = FailedAuthLimiter(options, clock=lambda: now[0])
    assert [limiter.failed("a", f"t{n}") for n in range(3)][:2] == [0.0, 0.0]
    assert limiter.blocked("a", "t9") is None  # three: not blocked yet
    limiter.failed("a", "t3")
    refusal = limiter.blocked("a", "t9")
    assert refusal is not None and type(refusal).__name__ == "RateLimited"
    assert limiter.blocked("b", "t9") is None  # another address, another token
    now[0] += 31
    assert limiter.blocked("a", "t9") is None
    # Failures spread wider than the window never add up to a block.
    for n in range(10):
        now[0] += 61
        assert limiter.failed("b", f"u{n}") == 0.0
    assert limiter.blocked("b", "u0") is None


def test_last_used_at_is_written_at_most_once_per_interval(db_url: str) -> None:
    # No token cache here: every request reaches authenticate(), which must still write once.
    options = ApiOptions(token_touch_s=3600, token_cache_s=0)
    with running_api(db_url, options=options) as api:

        def last_used() -> object:
            with api.state.engine.connect() as conn:
                return conn.execute(
                    select(api_tokens.c.last_used_at).where(api_tokens.c.name == "readonly-token")
                ).scalar_one()

        assert last_used() is None
        api.as_role("readonly", "GET", RUNS)
        first = last_used()
        assert first is not None
        api.as_role("readonly", "GET", RUNS)
        assert last_used() == first


def test_auth_disabled_serves_local_callers_only(db_url: str) -> None:
    with running_api(db_url, auth_disabled=True) as api:
        created = api.post(RUNS, json={"name": "t"})
        assert created.status_code == 201 and created.json()["trigger_ref"] == "dev"
        assert api.get("/api/v1/audit").status_code == 200
        with api.from_address("192.0.2.7") as remote:
            refused = remote.get(RUNS)
            assert refused.status_code == 403 and error_of(refused)["type"] == "forbidden"
