"""/docs and /redoc load nothing from outside: every asset they name is served by conveyor."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.conftest import ApiClient, running_api
from tests.api.pages import is_local, urls_in


@pytest.fixture
def local_api(sqlite_url: str) -> Iterator[ApiClient]:
    with running_api(sqlite_url) as client:
        yield client


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png"}),
    ],
)
def test_docs_pages_reference_only_local_urls_that_answer(
    local_api: ApiClient, page: str, assets: set[str]
) -> None:
    response = local_api.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    urls = urls_in(response.text)
    assert "/openapi.json" in urls
    assert [url for url in urls if not is_local(url)] == []
    assert {url.rsplit("/", 1)[-1] for url in urls} >= assets
    for url in urls:
        fetched = local_api.get(url)
        assert fetched.status_code == 200, url
        assert fetched.content, url
    assert "fonts.googleapis" not in response.text
    # What the bundles themselves would fetch from elsewhere (ReDoc's logo) the browser stops.
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data:" in policy


def test_the_url_reader_sees_external_references() -> None:
    """The check above could fail: a CDN script, a protocol-relative font and an inline
    `url:` are all found and judged external."""
    html = (
        '<link href="https://cdn.example/x.css"><script src="//fonts.example/f.js"></script>'
        "<script>SwaggerUIBundle({url: 'http://elsewhere/openapi.json'})</script>"
        '<a href="/runs?x=1">runs</a><a href="#top">top</a>'
    )
    urls = urls_in(html)
    assert [is_local(url) for url in urls] == [False, False, False, True, True]
