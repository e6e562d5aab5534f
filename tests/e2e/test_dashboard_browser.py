"""The dashboard in headless Chromium against a real `conveyor api` process: log in, follow a
run's logs live, cancel it with the page's button; a readonly token sees no button; nothing
the pages load comes from elsewhere (the browser's console would say)."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, select

from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.security import tokens as auth
from tests.api.conftest import add_logs, add_records
from tests.conftest import _truncate_pg
from tests.e2e.stack import ROOT, Stack
from tests.polling import eventually
from tests.runs_seed import insert_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver)",
    ),
]


# One API process and one browser for the whole module: each test makes runs of names (and
# queues) of its own, so none reads another's.
@pytest.fixture(scope="module")
def engine(pg_database: str) -> Iterator[Engine]:
    _truncate_pg(pg_database)
    eng = create_engine(pg_database)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def api(
    pg_database: str, engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    stack = Stack(pg_database, tmp_path_factory.mktemp("api"), "memory://")
    try:
        yield stack.api()
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chrome')}")
    options.add_argument("--window-size=1280,1000")
    # The console (what failed) and the network log (every request the pages made).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chrome: Any) -> Iterator[Any]:
    """The module's browser, its console and network log read empty at the start of a test."""
    chrome.delete_all_cookies()
    chrome.get_log("browser")
    chrome.get_log("performance")
    yield chrome


def token(engine: Engine, role: str) -> str:
    name = f"{role}-browser-{uuid.uuid4().hex[:8]}"  # one module, one database: many tokens
    return auth.create_token(UnitOfWork(engine), name, role, actor="test")[1]


def log_in(driver: Any, api: str, secret: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{api}/login")
    driver.find_element(By.ID, "token").send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    eventually(lambda: driver.title.startswith("Overview"), timeout=10, every=0.1)


def problems(driver: Any) -> list[str]:
    """What the console reported: failed loads, CSP refusals, script errors."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] != "INFO"]


def requested_urls(driver: Any) -> list[str]:
    """Every URL the browser asked for since the network log was last read."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def status_of(engine: Engine, run_id: str) -> str:
    with engine.connect() as conn:
        found = conn.execute(select(runs.c.status).where(runs.c.id == uuid.UUID(run_id)))
        return str(found.scalar_one())


def create(api: str, secret: str, name: str) -> str:
    created = httpx.post(
        f"{api}/api/v1/runs",
        json={"name": name, "allow_unknown": True},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def only_local(api: str, urls: list[str]) -> list[str]:
    """The URLs that went anywhere but this API on 127.0.0.1 (none should)."""
    assert api.startswith("http://127.0.0.1:")
    return [url for url in urls if not (url.startswith(f"{api}/") or url.startswith("data:"))]


def test_overview_shows_the_seeded_counts(api: str, engine: Engine, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    for status in ["pending", "pending", "pending", "running", "waiting", "succeeded"]:
        insert_run(engine, "ov", queue="q-overview", status=status)
    log_in(browser, api, token(engine, "readonly"))
    row = browser.find_element(By.CSS_SELECTOR, "tr[data-queue='q-overview']")
    counts = {
        cell.get_attribute("data-count"): cell.text
        for cell in row.find_elements(By.CSS_SELECTOR, "td[data-count]")
    }
    assert counts == {"pending": "3", "running": "1", "waiting": "1"}
    assert only_local(api, requested_urls(browser)) == []


def test_filter_runs_then_bulk_retry_changes_exactly_the_runs_counted(
    api: str, engine: Engine, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    matched = {
        insert_run(engine, "br-embed", status="failed", error="upstream said 503") for _ in range(3)
    }
    others = [
        insert_run(engine, "br-embed", status="failed", error="bad input"),
        insert_run(engine, "br-embed", status="succeeded"),
        insert_run(engine, "br-other", status="failed", error="upstream said 503"),
    ]
    log_in(browser, api, token(engine, "write"))
    browser.get(f"{api}/runs")
    browser.find_element(By.NAME, "name").send_keys("br-embed")
    browser.find_element(By.NAME, "error").send_keys("said 503")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type='submit']").click()
    eventually(lambda: "error=said+503" in browser.current_url, timeout=10)
    shown = {
        uuid.UUID(row.get_attribute("data-run"))
        for row in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    }
    assert shown == matched

    browser.find_element(By.ID, "retry-matching").click()
    count = eventually(lambda: browser.find_elements(By.ID, "bulk-count"), timeout=10)[0]
    assert count.text == "3"
    late = insert_run(engine, "br-embed", status="failed", error="upstream said 503 again")
    browser.find_element(By.ID, "bulk-confirm").click()
    done = eventually(lambda: browser.find_elements(By.ID, "bulk-done"), timeout=10)[0]
    assert done.get_attribute("data-count") == "3"

    with engine.connect() as conn:
        parents = conn.execute(
            select(runs.c.parent_run_id).where(runs.c.triggered_by == "retry")
        ).scalars()
        retried = list(parents)
    assert sorted(retried) == sorted(matched)  # each once; not the others, not the late one
    assert late not in retried and not set(others) & set(retried)
    assert problems(browser) == []


def test_log_in_follow_logs_live_and_cancel_with_the_button(
    api: str, engine: Engine, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    chrome = browser
    writer = token(engine, "write")
    run_id = create(api, writer, "live-report")
    add_logs(engine, run_id, range(1, 4))

    log_in(chrome, api, writer)
    assert chrome.find_element(By.ID, "throughput").tag_name == "svg"
    chrome.get(f"{api}/runs?name=live-report")
    chrome.find_element(By.CSS_SELECTOR, f"a[href='/runs/{run_id}']").click()
    eventually(lambda: chrome.find_elements(By.CSS_SELECTOR, "#logs [data-seq='3']"), timeout=10)

    add_logs(engine, run_id, range(4, 6))  # written while the page is open
    # Live means within 2 s of the write (the stream polls every sse_poll_s).
    eventually(
        lambda: chrome.find_elements(By.CSS_SELECTOR, "#logs [data-seq='5']"),
        timeout=2,
        every=0.05,
        what="the new log line on the page within 2 s",
    )
    assert "line 5" in chrome.find_element(By.ID, "logs").text

    chrome.find_element(By.ID, "cancel").click()
    chrome.switch_to.alert.accept()  # "Cancel this run?"
    eventually(lambda: chrome.find_elements(By.CSS_SELECTOR, "h1 .s-cancelled"), timeout=10)
    assert status_of(engine, run_id) == "cancelled"
    assert not chrome.find_elements(By.ID, "cancel")
    assert problems(chrome) == []


def test_readonly_sees_no_buttons_and_a_forged_post_is_refused(
    api: str, engine: Engine, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    chrome = browser
    run_id = create(api, token(engine, "write"), "ro-report")
    insert_run(engine, "ro-report", status="failed")
    log_in(chrome, api, token(engine, "readonly"))
    chrome.get(f"{api}/runs/{run_id}")
    assert chrome.find_element(By.CSS_SELECTOR, "h1 .status").text == "pending"
    assert chrome.find_elements(By.CSS_SELECTOR, "main button, main form[method='post']") == []
    chrome.get(f"{api}/runs?name=ro-report")
    assert chrome.find_elements(By.CSS_SELECTOR, "main button[type='submit']") != []  # Filter
    assert chrome.find_elements(By.CSS_SELECTOR, "#runs input[type='checkbox'], #bulk-links") == []
    # The session cookie is out of any script's reach.
    assert "conveyor_session" not in chrome.execute_script("return document.cookie")
    # A POST from this page's own origin, with the session cookie but no CSRF token.
    forged = chrome.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/x-www-form-urlencoded"}, body: "reason=x"})
          .then((r) => done(r.status), (e) => done(String(e)));""",
        f"/runs/{run_id}/cancel",
    )
    assert forged == 403
    assert status_of(engine, run_id) == "pending"
    problems(chrome)  # the refused fetch is reported there; read it away


SCREENSHOTS = ROOT / ".ci" / "screenshots"


def test_every_page_renders_from_this_server_only_with_a_screenshot(
    api: str, engine: Engine, browser: Any
) -> None:
    """Each page in turn, drawn without a console problem and without a request to any other
    host (the network log); a screenshot of each under .ci/screenshots/ for people to look at."""
    admin = token(engine, "admin")
    run_id = create(api, admin, "shot-report")
    add_logs(engine, run_id, range(1, 8))
    add_records(engine, run_id)
    insert_run(engine, "shot-report", status="failed", error="upstream said 503")
    made = httpx.post(
        f"{api}/api/v1/schedules",
        json={
            "name": "shot-nightly",
            "target": "shot-report",
            "trigger": "cron",
            "expression": "30 2 * * *",
            "timezone": "Europe/Berlin",
            "allow_unknown": True,
        },
        headers={"Authorization": f"Bearer {admin}"},
        timeout=10,
    )
    assert made.status_code == 201, made.text
    shots = {
        "login": "/login",
        "overview": "/",
        "runs": "/runs",
        "run": f"/runs/{run_id}",
        "bulk-confirm": "/runs/bulk?name=shot-report&action=retry",
        "schedules": "/schedules",
        "schedule": "/schedules/shot-nightly",
        "pipelines": "/pipelines",
        "projects": "/projects",
        "limits": "/limits",
        "audit": "/audit",
        "not-found": "/no-such-page",
    }
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.get(f"{api}/login")
    browser.save_screenshot(str(SCREENSHOTS / "login.png"))
    log_in(browser, api, admin)
    for name, path in shots.items():
        if name == "login":
            continue
        browser.get(f"{api}{path}")
        assert browser.find_elements("css selector", "main h1"), name
        assert browser.save_screenshot(str(SCREENSHOTS / f"{name}.png")), name
    for name in shots:
        assert (SCREENSHOTS / f"{name}.png").stat().st_size > 1000, name
    # The missing page is a 404 the console reports; nothing else may be.
    seen = problems(browser)
    assert [p for p in seen if "no-such-page" not in p] == [], seen
    assert only_local(api, requested_urls(browser)) == []


def test_swagger_ui_and_redoc_render_from_local_assets(api: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    chrome = browser
    chrome.get(f"{api}/docs")
    eventually(
        lambda: "conveyor" in chrome.find_element(By.CSS_SELECTOR, ".swagger-ui").text,
        timeout=15,
        every=0.2,
    )
    assert chrome.find_elements(By.CSS_SELECTOR, ".opblock")  # the operations, drawn
    chrome.get(f"{api}/redoc")
    eventually(lambda: "/api/v1/runs" in chrome.find_element(By.TAG_NAME, "body").text, 15, 0.2)
    # ReDoc always asks for its sidebar logo on its CDN; the page's policy stops the request
    # in the browser. Nothing else is asked of another host, and nothing else goes wrong.
    seen = problems(chrome)  # read once: reading the console empties it
    refused = [p for p in seen if "cdn.redoc.ly/redoc/logo-mini.svg" in p]
    assert refused and all("Content Security Policy" in p for p in refused), seen
    assert [p for p in seen if p not in refused] == []
