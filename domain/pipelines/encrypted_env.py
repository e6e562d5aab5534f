"""`encrypted_env` in pipeline.json: Fernet tokens opened with CONVEYOR_SECRET_KEY at discovery.

The tokens are made by `conveyor secrets encrypt` with the same MultiFernet as stored secrets
(domain/security/crypto.py), so one key, and one rotation, serves both. A value that does not
open disables its pipeline with file, key and reason; no message ever holds the token or the
plaintext. Opened values travel as `OpenedEnv`, whose repr shows names only, and a run masks
both the plaintexts and the tokens in everything it records.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.fernet import InvalidToken, MultiFernet

from domain.errors import ConfigurationError
from domain.security.crypto import fernet_for
from domain.security.masking import MASK, MIN_SECRET_CHARS

#: version byte + timestamp + IV + one AES block + HMAC: no Fernet token is shorter.
_MIN_TOKEN_BYTES = 1 + 8 + 16 + 16 + 32
_FERNET_VERSION = 0x80


class EncryptedEnvError(ConfigurationError):
    """A value of encrypted_env cannot be decrypted."""

    self_explanatory = True


@dataclass(frozen=True, repr=False)
class OpenedEnv:
    """The decrypted encrypted_env (name → plaintext) and the tokens it came from."""

    values: Mapping[str, str] = field(default_factory=dict)
    tokens: tuple[str, ...] = ()

    def __repr__(self) -> str:  # a stray print or traceback shows names, never values
        return f"OpenedEnv({', '.join(f'{n}={MASK}' for n in sorted(self.values))})"

    def masked(self) -> list[str]:
        """Everything a run must never record: the plaintexts and their tokens."""
        return [*self.values.values(), *self.tokens]


NOTHING = OpenedEnv()


def open_env(tokens: Mapping[str, str], key: str, *, source: str) -> OpenedEnv:
    """Decrypt every token; EncryptedEnvError with one `file: key 'encrypted_env.NAME': reason`
    clause per value that cannot be used."""
    if not tokens:
        return NOTHING
    try:
        fernet = fernet_for(key)
    except ConfigurationError as exc:  # no key, or a malformed one: its message names neither
        raise EncryptedEnvError(
            f"{source}: key 'encrypted_env': its values cannot be decrypted: {exc}",
            field="encrypted_env",
        ) from None
    values: dict[str, str] = {}
    problems: list[str] = []
    for name in sorted(tokens):
        plain, reason = _open_one(fernet, tokens[name])
        if reason is None:
            values[name] = plain
        else:
            problems.append(f"{source}: key 'encrypted_env.{name}': {reason}")
    if problems:
        raise EncryptedEnvError("; ".join(problems), field="encrypted_env")
    return OpenedEnv(values, tuple(tokens[n] for n in sorted(tokens)))


def _open_one(fernet: MultiFernet, token: str) -> tuple[str, str | None]:
    """(the plaintext, None) or ("", why it cannot be used)."""
    try:
        plain = fernet.decrypt(token.encode()).decode("utf-8")
    except InvalidToken:
        return "", _unopened(token)
    except UnicodeDecodeError:
        return "", "it decrypts to bytes that are not UTF-8 text"
    reason = _unusable(plain)
    return ("", reason) if reason else (plain, None)


def _unopened(token: str) -> str:
    """Why a token did not open, without quoting it: not a token at all, or another key's."""
    try:
        raw = base64.urlsafe_b64decode(token.encode())
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) < _MIN_TOKEN_BYTES or raw[0] != _FERNET_VERSION:
        return "not a Fernet token (make one with `conveyor secrets encrypt`)"
    return (
        "no key in CONVEYOR_SECRET_KEY decrypts it (it was encrypted with another key, or "
        "altered); while rotating keep the old key after the new one, comma-separated"
    )


def _unusable(plain: str) -> str | None:
    if "\x00" in plain:
        return "the decrypted value contains a NUL character, which no environment variable holds"
    if len(plain) < MIN_SECRET_CHARS:
        return (
            f"the decrypted value is shorter than {MIN_SECRET_CHARS} characters, too short to be "
            "masked in logs; use default_env for plain settings"
        )
    return None
