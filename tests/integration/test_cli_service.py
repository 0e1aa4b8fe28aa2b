"""``taskfs serve`` and ``taskfs submit`` as a user runs them: real processes, clear errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskfs.cli import running_service_url
from tests.support import clean_env


def taskfs(*args: str, data: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    env["TASKFS_DATA_DIR"] = str(data)
    return subprocess.run(
        [sys.executable, "-m", "taskfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    started = taskfs("serve", "--background", "--port", "0", "--data-dir", str(data), data=data)
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("http://127.0.0.1:")
    yield data
    taskfs("serve", "--stop", "--data-dir", str(data), data=data)


def test_print_key_creates_a_private_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = taskfs("serve", "--print-key", "--data-dir", str(data), data=data)
    second = taskfs("serve", "--print-key", "--data-dir", str(data), data=data)
    assert first.returncode == 0 and first.stdout == second.stdout
    assert first.stdout.strip() == (data / "api_key").read_text().strip()
    assert (data / "api_key").stat().st_mode & 0o777 == 0o600


def test_background_start_is_idempotent_and_stops(background: Path) -> None:
    url = running_service_url(background)
    again = taskfs("serve", "--background", "--data-dir", str(background), data=background)
    assert again.returncode == 0 and again.stdout.strip() == url
    stopped = taskfs("serve", "--stop", "--data-dir", str(background), data=background)
    assert stopped.returncode == 0
    assert running_service_url(background) is None


def test_submit_runs_and_prints_the_id(background: Path, tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "in.txt").write_text("42\n")
    result = taskfs(
        "submit",
        "--input",
        str(sim),
        "--project",
        "demo",
        "--ttl",
        "5m",
        "--",
        "cat",
        "in.txt",
        data=background,
    )
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.strip()
    assert len(task_id) == 25 and task_id.isalnum()
    multi = taskfs("submit", "-c", "echo a", "-c", "echo b", data=background)
    assert multi.returncode == 0, multi.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit"], "nothing to run"),
        (["submit", "--ttl", "soon", "--", "true"], "not a duration"),
        (["submit", "--input", "/nonexistent/dir", "--", "true"], "does not exist"),
        (["submit", "--bogus"], "unrecognized arguments"),
        (["serve", "--port", "eighty"], "invalid int value"),
    ],
)
def test_usage_errors_are_one_line(background: Path, args: list[str], message: str) -> None:
    result = taskfs(*args, data=background)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_service_is_a_clear_error(tmp_path: Path) -> None:
    result = taskfs("submit", "--", "true", data=tmp_path / "empty")
    assert result.returncode == 2
    assert "no local service" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_service_fails_within_the_deadline(tmp_path: Path) -> None:
    env_url = "http://127.0.0.1:9"  # discard port: connection refused
    key = tmp_path / "key"
    key.write_text("k\n")
    result = taskfs(
        "submit", "--api-url", env_url, "--api-key-file", str(key), "--", "true", data=tmp_path
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "error" in result.stderr
    assert "k\n" not in result.stderr
