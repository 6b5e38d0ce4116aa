"""Where the ``distillery`` command finds its API URL and key.

Each of ``url`` and ``api_key`` comes from the first place that has it: the command line flag
(``--url``, ``--api-key``), then the environment (``DISTILLERY_URL``, ``DISTILLERY_API_KEY``),
then the config file, a TOML file at ``~/.config/distillery/config.toml`` (another path in
``DISTILLERY_CONFIG``) with the keys ``url`` and ``api_key``. The URL defaults to
``http://127.0.0.1:8000`` (``distillery-server up``, ``make up``); there is no default key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from distillery_sdk.client import DEFAULT_URL


class ConfigError(Exception):
    """The config file cannot be read (bad TOML, wrong types)."""


@dataclass(frozen=True)
class Config:
    """The resolved settings and where each came from (``flag``, ``env``, ``file <path>``,
    ``default``, or None for a missing key)."""

    url: str
    api_key: str | None
    url_source: str
    key_source: str | None


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$DISTILLERY_CONFIG``, else ``~/.config/distillery/config.toml``."""
    env = os.environ if env is None else env
    explicit = env.get("DISTILLERY_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return Path("~/.config/distillery/config.toml").expanduser()


def _read_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    out: dict[str, str] = {}
    for name in ("url", "api_key"):
        if name in data:
            if not isinstance(data[name], str):
                raise ConfigError(f"{path}: {name} must be a string")
            out[name] = data[name]
    return out


def resolve(
    url: str | None = None, api_key: str | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Resolve the URL and key: flags (the arguments), then ``env`` (default
    ``os.environ``), then the config file.

    Raises: ConfigError when the config file is needed and unreadable.
    """
    env = os.environ if env is None else env
    path = config_path(env)
    file_values: dict[str, str] | None = None

    def from_file() -> dict[str, str]:
        nonlocal file_values
        if file_values is None:
            file_values = _read_file(path)
        return file_values

    if url:
        r_url, url_src = url, "flag"
    elif env.get("DISTILLERY_URL"):
        r_url, url_src = env["DISTILLERY_URL"], "env"
    elif from_file().get("url"):
        r_url, url_src = from_file()["url"], f"file {path}"
    else:
        r_url, url_src = DEFAULT_URL, "default"

    key: str | None
    key_src: str | None
    if api_key:
        key, key_src = api_key, "flag"
    elif env.get("DISTILLERY_API_KEY"):
        key, key_src = env["DISTILLERY_API_KEY"], "env"
    elif from_file().get("api_key"):
        key, key_src = from_file()["api_key"], f"file {path}"
    else:
        key, key_src = None, None
    return Config(url=r_url.rstrip("/"), api_key=key, url_source=url_src, key_source=key_src)
