"""uv honours pip's configuration: the machine's pip.conf and PIP_* variables become UV_*.

uv reads neither pip.conf nor PIP_* variables, so without this a host whose packages come from
a mirror, a local index or extra find-links would resolve differently for pipelines than for
`pip install`. Explicit UV_* variables always win over what is derived here.
"""

from __future__ import annotations

import configparser
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

#: pip option → (uv variable, how uv separates several values)
_OPTIONS: dict[str, tuple[str, str]] = {
    "index-url": ("UV_DEFAULT_INDEX", " "),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
    "find-links": ("UV_FIND_LINKS", ","),
    "constraint": ("UV_CONSTRAINT", " "),
    "trusted-host": ("UV_INSECURE_HOST", " "),
    "cert": ("SSL_CERT_FILE", " "),
    "timeout": ("UV_HTTP_TIMEOUT", " "),
    "default-timeout": ("UV_HTTP_TIMEOUT", " "),
}
_FLAGS = {"no-index": "UV_NO_INDEX"}


def pip_config_files(environ: Mapping[str, str], home: Path, prefix: Path) -> list[Path]:
    """pip's configuration files, lowest precedence first (pip's own order)."""
    if environ.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    xdg_dirs = environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(xdg_dirs) if d]
    files.append(Path("/etc/pip.conf"))
    files.append(home / ".pip" / "pip.conf")
    xdg_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    files.append(xdg_home / "pip" / "pip.conf")
    files.append(prefix / "pip.conf")
    if environ.get("PIP_CONFIG_FILE"):
        files.append(Path(environ["PIP_CONFIG_FILE"]))
    return files


def pip_settings(environ: Mapping[str, str], home: Path, prefix: Path) -> dict[str, str]:
    """pip's effective settings for `pip install` (files, [global] then [install], then env)."""
    values: dict[str, str] = {}
    for path in pip_config_files(environ, home, prefix):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # pip itself would complain; an unreadable file must not stop a run
        for section in ("global", "install"):
            if parser.has_section(section):
                for key, value in parser.items(section):
                    values[key.replace("_", "-")] = value
    for key, value in environ.items():
        if key.startswith("PIP_"):
            values[key[4:].lower().replace("_", "-")] = value
    return values


def uv_environment(
    environ: Mapping[str, str] | None = None,
    *,
    home: Path | None = None,
    prefix: Path | None = None,
) -> dict[str, str]:
    """UV_* variables equivalent to pip's configuration (to add to uv's environment)."""
    env = dict(os.environ if environ is None else environ)
    pip = pip_settings(env, home or Path.home(), prefix or _venv_prefix())
    out: dict[str, str] = {}
    for option, (variable, sep) in _OPTIONS.items():
        raw = pip.get(option)
        if raw and variable not in env and variable not in out:
            out[variable] = sep.join(raw.split())
    for option, variable in _FLAGS.items():
        if pip.get(option, "").lower() in {"1", "true", "yes", "on"} and variable not in env:
            out[variable] = "1"
    if "UV_EXTRA_INDEX_URL" in out and "UV_INDEX_STRATEGY" not in env:
        # pip picks the best version across all indexes; uv by default stops at the first
        # index that has the package, which a partial local mirror would turn into a failure.
        out["UV_INDEX_STRATEGY"] = "unsafe-best-match"
    # Interpreters come from the machine: a missing python_version is an error, not a download.
    out.setdefault("UV_PYTHON_DOWNLOADS", env.get("UV_PYTHON_DOWNLOADS", "never"))
    return out


def _venv_prefix() -> Path:
    import sys

    return Path(sys.prefix)


def uv_binary() -> str:
    """The `uv` executable shipped by the uv package (a declared dependency), else on PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            from domain.errors import ConfigurationError

            raise ConfigurationError(
                "uv is not installed; conveyor needs it to build pipeline environments "
                "(pip install uv)"
            ) from None
        return found
