"""The API's limits and intervals: defaults are what production runs with; Settings may
override them."""

from __future__ import annotations

from dataclasses import dataclass

from domain.settings import Settings


@dataclass(frozen=True)
class ApiOptions:
    """Limits and intervals; the defaults are what production runs with."""

    webhook_max_bytes: int = 1 << 20
    #: every other body (a run's params are at most 1 MB encoded, plus its options)
    body_max_bytes: int = 2 << 20
    webhook_tolerance_s: float = 300.0
    sse_poll_s: float = 0.25
    #: a comment line this often keeps proxies from closing an idle stream
    sse_keepalive_s: float = 15.0
    token_touch_s: float = 60.0
    #: how long a token that authenticated is trusted without asking the database again
    #: (so how long a token revoked by another process may still be accepted here)
    token_cache_s: float = 2.0
    auth_slow_after: int = 5
    auth_block_after: int = 20
    auth_window_s: float = 60.0
    auth_block_s: float = 300.0
    auth_max_delay_s: float = 2.0
    metrics_window_s: float = 3600.0
    metrics_cache_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiOptions:
        """Defaults, overridden by Settings fields of the same name where Settings has them
        (e.g. `webhook_max_bytes` from CONVEYOR_WEBHOOK_MAX_BYTES)."""
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(settings, n) for n in names if hasattr(settings, n)})
