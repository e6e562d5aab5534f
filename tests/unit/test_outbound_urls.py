"""Which callback and notification URLs can be delivered, read as the sender (httpx) reads them."""

from __future__ import annotations

import ipaddress

import pytest

from domain.callbacks.urls import is_public, undeliverable


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.slack.com/services/T0/B0/xyz?a=1",
        "http://bücher.de/x",  # IDN, sent as xn--bcher-kva.de
        "http://xn--bcher-kva.de/x",
        "HTTP://EXAMPLE.COM./x",
        "http://user:pw@example.com:8443/x",
        "http://127.0.0.1:8080/x",  # refused or not when sent (CONVEYOR_OUTBOUND_ALLOW_PRIVATE)
        "http://[::ffff:127.0.0.1]/x",
        "http://internal_host/x",
    ],
)
def test_deliverable_urls_pass(url: str) -> None:
    assert undeliverable(url) is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://0177.0.0.1/x", "host '0177.0.0.1': an IPv4 address must be written as four"),
        ("http://127.000.000.001/x", "reads it as 127.0.0.1"),
        ("http://2130706433/x", "reads it as 127.0.0.1"),
        ("http://0x7f.1/x", "reads it as 127.0.0.1"),
        ("http://1.2.3/x", "reads it as 1.2.0.3"),
        ("http://999.1.1.1/x", "host '999.1.1.1': not a valid IPv4 address"),
        ("http://example.123/x", "not a valid IPv4 address"),
        ("http://☃.net/x", "Invalid IDNA hostname"),
        ("http://xn--zz.com/x", "Invalid A-label"),
        ("http://ex%41mple.com/x", "host 'ex%41mple.com': not a valid host name"),
        ("http://a..b/x", "not a valid host name"),
        ("http://host:99999/x", "port 99999: expected 1 to 65535"),
        ("http://host:0/x", "port 0"),
        ("http://[fe80::1%25eth0]/x", "IPv6 zone"),
        ("http://a/\x00", "non-printable"),
        ("ftp://example.com/x", "expected an absolute http:// or https:// URL"),
        ("http://" + "a" * 2000, "longer than 2000 characters"),
    ],
)
def test_undeliverable_urls_say_why(url: str, why: str) -> None:
    assert why in (undeliverable(url) or "")


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64
        ("2002:7f00:1::", False),  # 6to4
        ("::7f00:1", False),  # IPv4-compatible
        ("::", False),
    ],
)
def test_ipv4_inside_ipv6_counts(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public
