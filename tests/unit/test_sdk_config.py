"""The ``distillery`` CLI's URL and key: flags, then environment, then the config file; and the
SDK's Server-Sent Events parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery_sdk.client import DEFAULT_URL, _sse_messages
from distillery_sdk.config import ConfigError, config_path, resolve


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('url = "http://file:1"\napi_key = "dk_file"\n')
    return path


def test_flags_win_over_env_and_file(cfg_file: Path) -> None:
    env = {
        "DISTILLERY_CONFIG": str(cfg_file),
        "DISTILLERY_URL": "http://env:2",
        "DISTILLERY_API_KEY": "dk_env",
    }
    c = resolve("http://flag:3/", "dk_flag", env=env)
    assert (c.url, c.api_key, c.url_source, c.key_source) == (
        "http://flag:3",
        "dk_flag",
        "flag",
        "flag",
    )


def test_env_wins_over_file(cfg_file: Path) -> None:
    env = {"DISTILLERY_CONFIG": str(cfg_file), "DISTILLERY_API_KEY": "dk_env"}
    c = resolve(None, None, env=env)
    assert c.api_key == "dk_env" and c.key_source == "env"
    assert c.url == "http://file:1" and c.url_source == f"file {cfg_file}"
    c = resolve(None, None, env={**env, "DISTILLERY_URL": "http://env:2"})
    assert c.url == "http://env:2" and c.url_source == "env"


def test_file_then_defaults(cfg_file: Path, tmp_path: Path) -> None:
    c = resolve(env={"DISTILLERY_CONFIG": str(cfg_file)})
    assert (c.url, c.api_key) == ("http://file:1", "dk_file")
    none = resolve(env={"DISTILLERY_CONFIG": str(tmp_path / "missing.toml")})
    assert none.url == DEFAULT_URL and none.url_source == "default"
    assert none.api_key is None and none.key_source is None


def test_default_path_and_bad_file(tmp_path: Path) -> None:
    assert config_path({}) == Path("~/.config/distillery/config.toml").expanduser()
    bad = tmp_path / "bad.toml"
    bad.write_text("url = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(env={"DISTILLERY_CONFIG": str(bad)})
    bad.write_text("api_key = 3\n")
    with pytest.raises(ConfigError, match="api_key must be a string"):
        resolve(env={"DISTILLERY_CONFIG": str(bad)})
    # a flag for both means the file is never read
    assert resolve("http://x", "dk_x", env={"DISTILLERY_CONFIG": str(bad)}).api_key == "dk_x"


def test_sse_parser_joins_data_lines_and_skips_comments() -> None:
    lines = [
        "retry: 1500",
        "",
        ": keep-alive",
        "",
        "id: 7",
        "event: stage",
        'data: {"a":',
        "data: 1}",
        "",
        "id: 8",
        "data: x",
    ]
    assert list(_sse_messages(iter(lines))) == [
        {"id": "7", "event": "stage", "data": '{"a":\n1}'},
        {"id": "8", "data": "x"},
    ]
