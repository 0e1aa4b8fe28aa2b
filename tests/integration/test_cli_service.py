"""``taskfs serve`` and ``taskfs submit`` as a user runs them: real processes, clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zipfile
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
    # Both ran: their commands' output is in their archives.
    assert outputs(background, task_id).read("artifacts/stdout.txt") == b"42\n"
    assert outputs(background, multi.stdout.strip()).read("artifacts/stdout.txt") == b"a\nb\n"


def outputs(data: Path, task_id: str) -> zipfile.ZipFile:
    """The task's output archive once it succeeded (``taskfs tasks wait`` exits 0)."""
    waited = taskfs("tasks", "wait", task_id, data=data, timeout=60)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    return zipfile.ZipFile(data / "storage" / task_id / "output.zip")


def test_submit_packs_input_by_the_same_rules_as_outputs(background: Path, tmp_path: Path) -> None:
    """Links out of the input are never uploaded, special files are skipped, old mtimes and
    names that are not UTF-8 do not stop a submission, empty directories are kept; each
    departure is one warning line."""
    sim = tmp_path / "sim"
    (sim / "empty").mkdir(parents=True)
    (sim / "in.txt").write_text("42\n")
    os.utime(sim / "in.txt", (0, 0))
    (tmp_path / "private").write_text("never uploaded\n")
    (sim / "leak").symlink_to(tmp_path / "private")
    (sim / "ok-link").symlink_to("in.txt")
    os.mkfifo(sim / "fifo")
    with open(os.fsencode(sim) + b"/caf\xe9", "wb") as f:
        f.write(b"x")
    result = taskfs("submit", "--input", str(sim), "--", "ls -A; cat ok-link", data=background)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warned = set()
    for line in result.stderr.splitlines():
        assert line.startswith("taskfs: warning: input "), line
        action, _, rest = line.removeprefix("taskfs: warning: input ").partition(": ")
        warned.add((action, json.JSONDecoder().raw_decode(rest)[0]))
    assert warned == {
        ("clamped", "in.txt"),
        ("clamped", "ok-link"),  # a link inside the tree is packed as its target
        ("renamed", "caf%E9"),
        ("skipped", "fifo"),
        ("skipped", "leak"),
    }
    task_id = result.stdout.strip()
    stdout = outputs(background, task_id).read("artifacts/stdout.txt").decode()
    assert stdout.split() == [
        "caf%E9",
        "empty",
        "in.txt",
        "ok-link",
        "stderr.txt",
        "stdout.txt",
        "42",
    ]
    with zipfile.ZipFile(background / "storage" / task_id / "input.zip") as sent:
        assert sorted(sent.namelist()) == [
            "sim_dir/",
            "sim_dir/caf%E9",
            "sim_dir/empty/",
            "sim_dir/in.txt",
            "sim_dir/ok-link",
        ]
        assert b"never uploaded" not in b"".join(sent.read(n) for n in sent.namelist())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit"], "nothing to run"),
        (["submit", "--ttl", "soon", "--", "true"], "not a duration"),
        (["submit", "--input", "/nonexistent/dir", "--", "true"], "does not exist"),
        (["submit", "--input", "/etc/hostname", "--", "true"], "is not a directory"),
        (["submit", "--input", "x" * 300, "--", "true"], "File name too long"),
        (["submit", "--bogus"], "unrecognized arguments"),
        (["serve", "--port", "eighty"], "not a port number"),
        # Bytes that are not UTF-8 (the OS hands them over as surrogates) where the API
        # takes text.
        (["submit", "--project", "bad\udcffbyte", "--", "true"], "API needs: bad\\xffbyte"),
        (["submit", "--", "echo", "\udcff"], "not UTF-8 text, which the API needs: echo"),
        (["tasks", "list", "--project", "\udcff"], "not UTF-8 text"),
        # A URL that cannot be one, wherever it comes from.
        (["tasks", "list", "--api-url", "http://[::1"], "not a valid API URL"),
        (["tasks", "list", "--api-url", "http://127.0.0.1:99999"], "Port out of range"),
        (["submit", "--api-url", "http://:80", "--", "true"], "(no host)"),
        (["submit", "--deadline", "soon", "--", "true"], "error: submit: argument --deadline"),
    ],
)
def test_usage_errors_are_one_line(background: Path, args: list[str], message: str) -> None:
    result = taskfs(*args, data=background)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    listed = taskfs("tasks", "list", "--json", data=background)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []  # nothing half-made


def test_no_service_is_a_clear_error(tmp_path: Path) -> None:
    result = taskfs("submit", "--", "true", data=tmp_path / "empty")
    assert result.returncode == 69  # the service asked for is unavailable, as with a URL
    assert "no local service" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["refused", "stalled"])
def test_unreachable_service_fails_within_the_deadline(tmp_path: Path, how: str) -> None:
    """``--deadline 2`` bounds the whole command, retries included, whether the service
    refuses connections or accepts them and never answers. (The bound checked is the
    deadline's promise, with a wide margin for a loaded machine, not a speed.)"""
    key = tmp_path / "key"
    key.write_text("k\n")
    with socket.socket() as listener:
        if how == "stalled":  # accepts connections (the backlog) but never answers
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        else:
            url = "http://127.0.0.1:9"  # discard port: connection refused
        started = time.monotonic()
        result = taskfs(
            "submit",
            "--api-url",
            url,
            "--api-key-file",
            str(key),
            "--deadline",
            "2",
            "--",
            "true",
            data=tmp_path,
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 69  # the service could not be reached
    assert "Traceback" not in result.stderr and "error" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "k\n" not in result.stderr
    assert elapsed < 2 + 10, f"the command took {elapsed:.1f} s with --deadline 2"


def test_a_data_dir_that_is_a_file_is_not_a_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "taskfs.py"
    a_file.write_text("mine\n")
    result = taskfs("serve", "--background", "--port", "0", "--data-dir", str(a_file), data=a_file)
    assert result.returncode == 1
    assert result.stderr == f"taskfs: error: Not a directory: {a_file}\n"
    assert a_file.read_text() == "mine\n"


def test_a_closed_standard_output_is_one_error_and_undone_or_said(background: Path) -> None:
    """``taskfs ... >&-``: no traceback; a result that cannot be shown is an error, and what
    the command did anyway is said (the id of a task it submitted) or taken back."""
    env = {**clean_env(), "TASKFS_DATA_DIR": str(background)}

    def closed(*args: str) -> subprocess.CompletedProcess[str]:
        command = " ".join([sys.executable, "-m", "taskfs", *args]) + " >&-"
        return subprocess.run(
            ["sh", "-c", command], capture_output=True, text=True, env=env, timeout=60
        )

    version = closed("--version")
    assert version.returncode == 1
    assert version.stderr == (
        "taskfs: error: cannot write to standard output: standard output is closed\n"
    )
    submitted = closed("submit", "--data-dir", str(background), "--", "true")
    assert submitted.returncode == 1 and "Traceback" not in submitted.stderr
    said = submitted.stderr.split("; task ")[1].split()[0]  # "...; task <id> was submitted"
    listed = taskfs("tasks", "list", "--json", data=background)
    assert [t["task_id"] for t in json.loads(listed.stdout)] == [said]
    listing = closed("tasks", "list", "--data-dir", str(background))
    assert listing.returncode == 1
    assert listing.stderr.startswith("taskfs: error: ") and "closed" in listing.stderr
    assert len(listing.stderr.splitlines()) == 1


@pytest.mark.parametrize("args", [["logs", "--help"], ["--help"], ["tasks", "list", "--help"]])
def test_help_into_a_closed_pipe_ends_quietly(args: list[str]) -> None:
    """``taskfs logs --help | head -1``: output into a pipe nobody reads ends quietly, as
    cat's does (the reading end is closed before the command starts: EPIPE every time)."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "taskfs", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            env=clean_env(),
            check=False,
        )
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode in (0, -13)  # -13: SIGPIPE, as for cat
