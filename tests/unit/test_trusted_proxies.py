"""CONVEYOR_TRUSTED_PROXIES: addresses or networks, written as uvicorn matches them."""

from __future__ import annotations

import re

import pytest

from domain.errors import ConfigurationError
from domain.settings import load_settings


def test_entries_are_normalised_and_empty_trusts_nobody() -> None:
    assert load_settings().trusted_proxy_list == []
    given = " 10.0.0.5, 10.1.2.3/16 ,::1,"
    # uvicorn would silently ignore 10.1.2.3/16 (host bits set): it becomes the network.
    assert load_settings(trusted_proxies=given).trusted_proxy_list == [
        "10.0.0.5",
        "10.1.0.0/16",
        "::1",
    ]


@pytest.mark.parametrize("bad", ["proxy.local", "10.0.0.300", "*", "10.0.0.0/33"])
def test_anything_else_is_a_clear_error(bad: str) -> None:
    expected = re.escape(f"CONVEYOR_TRUSTED_PROXIES: '{bad}' is not an IP address or network")
    with pytest.raises(ConfigurationError, match=f"^{expected}"):
        load_settings(trusted_proxies=f"10.0.0.5,{bad}")
