"""Encryption at rest: Fernet with key rotation (MultiFernet) from CONVEYOR_SECRET_KEY."""

from __future__ import annotations

import os
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from domain.errors import ConfigurationError

GENERATE_HINT = (
    'generate one with: python -c "from cryptography.fernet import Fernet; '
    'print(Fernet.generate_key().decode())"'
)


def fernet_for(key: str) -> MultiFernet:
    """A MultiFernet for comma-separated Fernet keys: the first encrypts, all of them decrypt,
    so a new key is put first and the old one kept until everything was re-encrypted."""
    parts = [part.strip() for part in key.split(",") if part.strip()]
    if not parts:
        raise ConfigurationError(
            f"CONVEYOR_SECRET_KEY is not set; {GENERATE_HINT}", field="secret_key"
        )
    fernets = []
    for index, part in enumerate(parts):
        try:
            fernets.append(Fernet(part.encode()))
        except (ValueError, TypeError):
            # Never echo the key itself: the message may end up in a log.
            raise ConfigurationError(
                f"CONVEYOR_SECRET_KEY: key #{index + 1} is not a Fernet key "
                f"(32 url-safe base64-encoded bytes); {GENERATE_HINT}",
                field="secret_key",
            ) from None
    return MultiFernet(fernets)


def encrypt(key: str, plaintext: str) -> str:
    return fernet_for(key).encrypt(plaintext.encode()).decode()


def decrypt(key: str, ciphertext: str) -> str:
    """The plaintext; a ciphertext no configured key opens is a ConfigurationError (the key
    was changed without keeping the old one)."""
    try:
        return fernet_for(key).decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise ConfigurationError(
            "a stored secret cannot be decrypted with CONVEYOR_SECRET_KEY; keep the old key "
            "after the new one (comma-separated) while rotating",
            field="secret_key",
        ) from None


def secret_key_from(settings: Any) -> str:
    """The configured key: Settings.secret_key when it exists, else CONVEYOR_SECRET_KEY.
    Empty when neither is set (callers that need it fail with fernet_for's message)."""
    value: Any = getattr(settings, "secret_key", None)
    if value is not None and hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return str(value or os.environ.get("CONVEYOR_SECRET_KEY", ""))
