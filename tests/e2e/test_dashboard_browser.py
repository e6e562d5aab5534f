"""The dashboard in headless Chromium against a real `conveyor api` process: log in, follow a
run's logs live, cancel it with the page's button; a readonly token sees no button; nothing
the pages load comes from elsewhere (the browser's console would say)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, select

from domain.db.models import runs
from domain.db.unit_of_work import UnitOfWork
from domain.security import tokens as auth
from tests.api.conftest import add_logs
from tests.e2e.stack import Stack
from tests.polling import eventually

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


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    eng = create_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def api(pg_url: str, tmp_path: Path) -> Iterator[str]:
    stack = Stack(pg_url, tmp_path, "memory://")
    try:
        yield stack.api()
    finally:
        stack.stop_all()


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome'}")
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def token(engine: Engine, role: str) -> str:
    return auth.create_token(UnitOfWork(engine), f"{role}-browser", role, actor="test")[1]


def log_in(driver: Any, api: str, secret: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{api}/login")
    driver.find_element(By.ID, "token").send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    eventually(lambda: driver.title.startswith("Overview"), timeout=10, every=0.1)


def problems(driver: Any) -> list[str]:
    """What the console reported: failed loads, CSP refusals, script errors."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] != "INFO"]


def status_of(engine: Engine, run_id: str) -> str:
    with engine.connect() as conn:
        found = conn.execute(select(runs.c.status).where(runs.c.id == uuid.UUID(run_id)))
        return str(found.scalar_one())


def test_log_in_follow_logs_live_and_cancel_with_the_button(
    api: str, engine: Engine, chrome: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    writer = token(engine, "write")
    created = httpx.post(
        f"{api}/api/v1/runs",
        json={"name": "report", "allow_unknown": True},
        headers={"Authorization": f"Bearer {writer}"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    add_logs(engine, run_id, range(1, 4))

    log_in(chrome, api, writer)
    assert chrome.find_element(By.ID, "throughput").tag_name == "svg"
    chrome.get(f"{api}/runs")
    chrome.find_element(By.CSS_SELECTOR, f"a[href='/runs/{run_id}']").click()
    eventually(lambda: chrome.find_elements(By.CSS_SELECTOR, "#logs [data-seq='3']"), timeout=10)

    add_logs(engine, run_id, range(4, 6))  # written while the page is open
    eventually(
        lambda: chrome.find_elements(By.CSS_SELECTOR, "#logs [data-seq='5']"), timeout=15, every=0.2
    )
    assert "line 5" in chrome.find_element(By.ID, "logs").text
    chrome.save_screenshot(str(tmp_path / "run.png"))

    chrome.find_element(By.ID, "cancel").click()
    chrome.switch_to.alert.accept()  # "Cancel this run?"
    eventually(lambda: chrome.find_elements(By.CSS_SELECTOR, "h1 .s-cancelled"), timeout=10)
    assert status_of(engine, run_id) == "cancelled"
    assert not chrome.find_elements(By.ID, "cancel")
    assert problems(chrome) == []


def test_readonly_sees_no_buttons_in_the_browser(api: str, engine: Engine, chrome: Any) -> None:
    from selenium.webdriver.common.by import By

    writer = token(engine, "write")
    run_id = httpx.post(
        f"{api}/api/v1/runs",
        json={"name": "report", "allow_unknown": True},
        headers={"Authorization": f"Bearer {writer}"},
        timeout=10,
    ).json()["id"]
    log_in(chrome, api, token(engine, "readonly"))
    chrome.get(f"{api}/runs/{run_id}")
    assert chrome.find_element(By.CSS_SELECTOR, "h1 .status").text == "pending"
    assert chrome.find_elements(By.ID, "cancel") == []
    assert chrome.find_elements(By.ID, "retry") == []
    # The session cookie is out of any script's reach.
    assert "conveyor_session" not in chrome.execute_script("return document.cookie")
    assert problems(chrome) == []


def test_swagger_ui_and_redoc_render_from_local_assets(api: str, chrome: Any) -> None:
    from selenium.webdriver.common.by import By

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
