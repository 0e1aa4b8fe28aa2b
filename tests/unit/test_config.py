"""Settings: value parsing and where the URL and key come from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from taskfs.config import (
    ClientSettings,
    local_service_pid,
    parse_duration,
    parse_size,
    resolve_client,
)
from taskfs.errors import AuthError, ServiceError, UsageError
from taskfs.server.app import DataDirLock


@pytest.mark.parametrize(
    ("text", "size"),
    [("10G", 10 << 30), ("500M", 500 << 20), ("1.5K", 1536), ("42", 42), ("2GiB", 2 << 30)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "10X", "-1G", "1 0G"])
def test_parse_size_errors(text: str) -> None:
    with pytest.raises(UsageError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("2d", 172800)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "m10", "1h 30m"])
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(UsageError, match="not a duration"):
        parse_duration(text)


def test_local_service_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INDUCTIVA_API_URL", raising=False)
    monkeypatch.setenv("INDUCTIVA_API_KEY", "cloud-key")
    with pytest.raises(ServiceError, match="no local service"):
        resolve_client(data_dir=tmp_path)
    (tmp_path / "api_key").write_text("local-key\n")
    server = {"url": "http://127.0.0.1:9", "pid": os.getpid()}
    (tmp_path / "server.json").write_text(json.dumps(server))
    # A server.json nobody holds the data dir's lock for is a dead service's: not used.
    with pytest.raises(ServiceError, match="no local service"):
        resolve_client(data_dir=tmp_path)
    lock = DataDirLock(tmp_path)
    lock.acquire()
    try:
        assert local_service_pid(tmp_path) == os.getpid()
        settings = resolve_client(data_dir=tmp_path)
        assert settings.api_url == "http://127.0.0.1:9"
        assert settings.api_key == "local-key" and settings.local_data_dir == tmp_path
        # The lock is held, but by another pid than server.json names: a stale file.
        (tmp_path / "server.json").write_text(json.dumps({**server, "pid": 1}))
        with pytest.raises(ServiceError, match="no local service"):
            resolve_client(data_dir=tmp_path)
    finally:
        lock.release()
    assert local_service_pid(tmp_path) is None


def test_remote_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("INDUCTIVA_API_URL", "https://api.example/")
    monkeypatch.delenv("INDUCTIVA_API_KEY", raising=False)
    with pytest.raises(AuthError, match="does not exist"):
        resolve_client()
    (tmp_path / ".inductiva").mkdir()
    (tmp_path / ".inductiva" / "api_key").write_text("file-key")
    assert resolve_client().api_key == "file-key"
    monkeypatch.setenv("INDUCTIVA_API_KEY", "env-key")
    settings = resolve_client()
    assert settings.api_url == "https://api.example" and settings.api_key == "env-key"
    explicit = tmp_path / "k"
    explicit.write_text("explicit-key\n")
    assert resolve_client(api_key_file=explicit).api_key == "explicit-key"
    monkeypatch.setenv("INDUCTIVA_API_KEY", "bad key")
    with pytest.raises(AuthError, match="valid key"):
        resolve_client()
    with pytest.raises(UsageError, match="http"):
        resolve_client(api_url="ftp://x")


def test_key_is_not_in_repr() -> None:
    settings = ClientSettings(api_url="http://x", api_key="sekrit-key")
    assert "sekrit-key" not in repr(settings)
