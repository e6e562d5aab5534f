"""Time and identifiers: UTC-aware clock and time-ordered UUIDs."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


_last = 0
_lock = threading.Lock()


def uuid7() -> uuid.UUID:
    """A version-7 UUID (RFC 9562): millisecond timestamp first, so ids sort by creation time.

    Time-ordered keys keep B-tree inserts local, which matters at thousands of runs a second.
    Within one process ids are strictly increasing (RFC 9562 6.2, method 2: a tie in the same
    millisecond increments the previous id), so a listing's tie-break follows creation order.
    """
    global _last
    value = _random_uuid7()
    with _lock:
        if value <= _last:
            value = _last + 1
        _last = value
    return uuid.UUID(int=value)


def _random_uuid7() -> int:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 68) << 64 & (0xFFF << 64)  # 12 random bits (rand_a)
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # 62 random bits (rand_b)
    return value
