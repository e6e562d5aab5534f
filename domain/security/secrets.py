"""Stored secrets: Fernet-encrypted at rest (MultiFernet, so keys rotate), masked in output.

A secret's value is only ever decrypted to be injected into a pipeline that names it; wherever a
value could be shown (run logs, env listings, errors, CLI, API) `domain.security.masking.Masker`
puts `***` in its place, in whatever form it was printed. Secrets marked `is_parameter` are plain
settings (Fast-Flow's "parameters"): still encrypted at rest, but not masked, since they are meant
to be visible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from cryptography.fernet import InvalidToken, MultiFernet
from sqlalchemy import Engine, Table, delete, func, select, update

from domain.clock import Clock, utc_now
from domain.db.models_platform import Secret
from domain.errors import ConfigurationError, InvalidInput, NotFound
from domain.pipelines.config import ENV_NAME
from domain.security.crypto import fernet_for
from domain.security.masking import MASK, MIN_SECRET_CHARS

secrets_table = cast(Table, Secret.__table__)

MAX_VALUE_BYTES = 64 * 1024


class SecretNotFound(NotFound):
    """No secret has this name."""


class SecretKeyError(ConfigurationError):
    """CONVEYOR_SECRET_KEY cannot decrypt the stored secrets."""


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """What may be shown about a secret: never its value."""

    name: str
    is_parameter: bool
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "is_parameter": self.is_parameter,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class SecretValue:
    value: str
    is_parameter: bool

    def __repr__(self) -> str:  # a stray print or traceback never shows the value
        return f"SecretValue({MASK}, is_parameter={self.is_parameter})"


def check_name(name: str) -> str:
    if not re.match(ENV_NAME, name) or len(name) > 200:
        raise InvalidInput(
            f"secret name {name!r}: expected letters, digits and _ (not starting with a digit), "
            "since it becomes an environment variable",
            field="name",
        )
    return name


def check_value(value: str, *, is_parameter: bool) -> str:
    if "\x00" in value:
        raise InvalidInput("secret value: must not contain NUL characters", field="value")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise InvalidInput(f"secret value: longer than {MAX_VALUE_BYTES} bytes", field="value")
    if not is_parameter and len(value) < MIN_SECRET_CHARS:
        raise InvalidInput(
            f"secret value: at least {MIN_SECRET_CHARS} characters (shorter values cannot be "
            "masked in logs without hiding ordinary text); use --parameter for plain settings",
            field="value",
        )
    return value


class SecretStore:
    """Secrets in the `secrets` table, encrypted with `key` (comma-separated Fernet keys)."""

    def __init__(self, engine: Engine, key: str, *, clock: Clock = utc_now) -> None:
        self.engine = engine
        self._key = key
        self._fernet: MultiFernet | None = None
        self.clock = clock

    @property
    def fernet(self) -> MultiFernet:
        """Built on first use: listing and removing need no key, encrypting does."""
        if self._fernet is None:
            self._fernet = fernet_for(self._key)
        return self._fernet

    def set(self, name: str, value: str, *, is_parameter: bool = False) -> bool:
        """Store (or replace) a secret; True when it is new."""
        check_name(name)
        check_value(value, is_parameter=is_parameter)
        token = self.fernet.encrypt(value.encode()).decode()
        now = self.clock()
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(secrets_table)
                .where(secrets_table.c.name == name)
                .values(ciphertext=token, is_parameter=is_parameter, updated_at=now)
            ).rowcount
            if not changed:
                conn.execute(
                    secrets_table.insert().values(
                        name=name,
                        ciphertext=token,
                        is_parameter=is_parameter,
                        created_at=now,
                        updated_at=now,
                    )
                )
        return not changed

    def list_all(self) -> list[SecretInfo]:
        cols = secrets_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(cols.name, cols.is_parameter, cols.created_at, cols.updated_at).order_by(
                    cols.name
                )
            ).all()
        return [SecretInfo(r[0], bool(r[1]), r[2], r[3]) for r in rows]

    def remove(self, name: str) -> None:
        with self.engine.begin() as conn:
            gone = conn.execute(delete(secrets_table).where(secrets_table.c.name == name)).rowcount
        if not gone:
            raise SecretNotFound(f"no secret named {name!r}", name=name)

    def values(self, names: Iterable[str]) -> dict[str, SecretValue]:
        """Decrypted values of `names`; a missing name is SecretNotFound naming all missing."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        cols = secrets_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(cols.name, cols.ciphertext, cols.is_parameter).where(cols.name.in_(wanted))
            ).all()
        found = {r[0]: SecretValue(self._decrypt(r[0], r[1]), bool(r[2])) for r in rows}
        missing = [n for n in wanted if n not in found]
        if missing:
            raise SecretNotFound(
                "no stored secret named " + ", ".join(repr(n) for n in missing) + "; set it with "
                "`conveyor secrets set NAME`",
                names=missing,
            )
        return found

    def rotate(self) -> int:
        """Re-encrypt every secret with the first key; returns how many were rewritten."""
        cols = secrets_table.c
        with self.engine.begin() as conn:
            rows = conn.execute(select(cols.name, cols.ciphertext)).all()
            for name, token in rows:
                try:
                    fresh = self.fernet.rotate(token.encode()).decode()
                except InvalidToken:
                    raise self._wrong_key(name) from None
                conn.execute(
                    update(secrets_table)
                    .where(cols.name == name)
                    .values(ciphertext=fresh, updated_at=self.clock())
                )
        return len(rows)

    def verify(self) -> int:
        """Check at start that the key opens every stored secret (a clear error now instead of a
        failed run later); returns how many there are. No secrets: no key needed."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(secrets_table.c.name, secrets_table.c.ciphertext)).all()
            if not rows:
                return 0
        for name, token in rows:
            self._decrypt(name, token)
        return len(rows)

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(secrets_table)).scalar_one())

    def _decrypt(self, name: str, token: str) -> str:
        try:
            return self.fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise self._wrong_key(name) from None

    @staticmethod
    def _wrong_key(name: str) -> SecretKeyError:
        return SecretKeyError(
            f"secret {name!r} cannot be decrypted with CONVEYOR_SECRET_KEY (a different key "
            "encrypted it); while rotating keep the old key after the new one, comma-separated",
            field="secret_key",
        )
