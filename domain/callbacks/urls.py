"""Which URLs a callback or notification may be sent to, checked the way the sender reads them.

`undeliverable` is asked at enqueue (a run's `callback_url`, a notification rule's URL) and again
before each POST, so a URL refused by the HTTP client (httpx, which sends them) is refused with a
clear reason instead of failing in the middle of a delivery pass. IPv4 addresses must be written
in dotted decimal: `0177.0.0.1`, `127.000.000.001`, `2130706433` or `0x7f.1` mean 127.0.0.1 to the
C resolver but are refused or read as names elsewhere, so they are refused here rather than let
past the private-address check under a disguise. `is_public` is that check's rule for one
address, IPv4 addresses inside IPv6 ones included.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import httpx

MAX_URL = 2000
_SHAPE = re.compile(r"^https?://[^\s/?#]+\S*$", re.IGNORECASE)
# The URL standard reads a host whose last label is a number (decimal, or 0x hex) as IPv4.
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0[xX][0-9a-fA-F]*)$")
_LABEL = re.compile(r"^[a-z0-9_-]{1,63}$")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")


def undeliverable(url: str) -> str | None:
    """Why no POST to `url` can ever be made (a sentence naming the part at fault), or None."""
    if len(url) > MAX_URL:
        return f"longer than {MAX_URL} characters"
    if not _SHAPE.match(url):
        return "expected an absolute http:// or https:// URL"
    try:
        parsed = httpx.URL(url)
        host, raw_host = parsed.host, parsed.raw_host.decode("ascii")
        port = parsed.port
    except (httpx.InvalidURL, UnicodeError) as exc:
        hint = _ipv4_problem(_host_part(url))
        return hint or f"not a URL an HTTP client can use ({exc})"
    if not host:
        return "the URL has no host"
    if port is not None and not 0 < port < 65536:
        return f"port {port}: expected 1 to 65535"
    if ":" in host:  # an IPv6 literal: httpx checked it
        return "an IPv6 zone (%...) cannot be used in a URL" if "%" in host else None
    return _ipv4_problem(host) or _name_problem(raw_host)


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True when `address`, and any IPv4 address carried inside it, is globally reachable."""
    inner: list[ipaddress.IPv4Address | None] = []
    if isinstance(address, ipaddress.IPv6Address):
        inner += [address.ipv4_mapped, address.sixtofour, address.teredo and address.teredo[1]]
        low = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address in _NAT64 or (address in _COMPATIBLE and int(address) > 1):
            inner.append(low)
    return address.is_global and all(a is None or a.is_global for a in inner)


def _host_part(url: str) -> str:
    authority = url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return authority.rpartition("@")[2].rsplit(":", 1)[0] if "]" not in authority else ""


def _ipv4_problem(host: str) -> str | None:
    labels = host.rstrip(".").split(".")
    if not host or not _NUMERIC_LABEL.match(labels[-1]):
        return None  # a name, not an address
    try:
        canonical = str(ipaddress.IPv4Address(host))
    except ValueError:
        canonical = ""
    if canonical == host:
        return None
    try:
        meant = f" (a resolver reads it as {socket.inet_ntoa(socket.inet_aton(host))})"
    except OSError:
        return f"host {host!r}: not a valid IPv4 address"
    return (
        f"host {host!r}: an IPv4 address must be written as four decimal numbers without "
        f"leading zeros{meant}"
    )


def _name_problem(name: str) -> str | None:
    labels = name.lower().rstrip(".").split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return f"host {name!r}: not a valid host name"
    return None
