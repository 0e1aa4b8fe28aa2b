"""The live channel end to end: the embedded service's answerer and taskfs's own client over
real WebRTC on 127.0.0.1 (loopback candidates only), against tasks that really run.

The oracle for a followed ``tail`` is the file itself: the lines received, joined, must be
exactly the task's stdout, however the writer cut its writes."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from typing import Any

import httpx
import pytest
import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from taskfs.api.submit import submit_task
from taskfs.errors import LiveError
from taskfs.task import Task
from tests.integration.conftest import Service
from tests.support import clean_env, taskfs_cmd, wait_status

pytest.importorskip("aiortc")

from taskfs.live.client import LiveConnection
from taskfs.live.protocol import Request

PY = sys.executable


def tail(filename: str, lines: int = 10, follow: bool = False, wait: bool = False) -> Request:
    return Request("tail", follow, {"filename": filename, "lines": lines, "wait": wait})


async def computing(api: ApiClient, *commands: str) -> str:
    task_id = await submit_task(api, list(commands))
    await wait_status(api, task_id, lambda s: s.status == S.COMPUTATION_STARTED or s.is_terminated)
    status = await api.get_status(task_id)
    assert status.status == S.COMPUTATION_STARTED, status
    return task_id


async def one_shot(api: ApiClient, task_id: str, request: Request) -> Any:
    connection = LiveConnection(api, task_id)
    try:
        stream = await connection.connect(request)
        return await stream.first()
    finally:
        await connection.aclose()


async def follow_all(api: ApiClient, task_id: str, request: Request) -> list[Any]:
    connection = LiveConnection(api, task_id)
    got: list[Any] = []
    try:
        with trio.fail_after(60):
            stream = await connection.connect(request)
            async for answer in stream:
                got.append(answer.message)
    finally:
        await connection.aclose()
    return got


# A writer that cuts its output at random places (inside lines, inside UTF-8 characters) and
# flushes each piece: the follower must rebuild every line once, in order.
TEXT = r"""
import random
rnd = random.Random(7)
text = "".join(f"line {i} é{'x' * rnd.randrange(0, 300)}\n" for i in range(3000)).encode()
"""
WRITER = (
    TEXT
    + r"""
import os, time
time.sleep(0.5)
pos = 0
while pos < len(text):
    step = rnd.randrange(1, 200)
    os.write(1, text[pos:pos + step])
    pos += step
    if rnd.random() < 0.05:
        time.sleep(0.01)
os.write(1, b"no newline at the end")
time.sleep(1)
"""
)


async def test_followed_tail_rebuilds_the_file_across_the_task_end(api: ApiClient) -> None:
    task_id = await computing(api, f"{PY} -c {shlex.quote(WRITER)}")
    messages = await follow_all(api, task_id, tail("stdout.txt", lines=1 << 30, follow=True))
    lines = [line for batch in messages for line in batch]
    made: dict[str, Any] = {}
    exec(TEXT, made)
    # Complete lines while the task runs; at its end, its unterminated last line too.
    assert "\n".join(lines) == made["text"].decode() + "no newline at the end"
    assert len(lines) == 3001
    # The stream ended by itself because the task stopped computing (its outputs are being
    # packed, or it has ended).
    assert (await wait_status(api, task_id)).status == S.SUCCESS


async def test_one_shot_tail_gives_the_last_lines(api: ApiClient) -> None:
    task_id = await computing(api, "seq 1 100; printf 'partial'; sleep 30")
    await trio.sleep(0.5)
    assert await one_shot(api, task_id, tail("stdout.txt", lines=3)) == ["99", "100", "partial"]
    assert await one_shot(api, task_id, tail("stdout.txt", lines=0)) == []
    await api.kill(task_id)


async def test_followed_tail_withholds_a_partial_line(api: ApiClient) -> None:
    task_id = await computing(
        api, "echo first; printf 'sec'; sleep 1; printf 'ond\\nthird\\n'; sleep 1"
    )
    messages = await follow_all(api, task_id, tail("stdout.txt", lines=10, follow=True))
    assert [line for batch in messages for line in batch] == ["first", "second", "third"]
    assert "sec" not in [line for batch in messages for line in batch]


async def test_tail_waits_for_a_file_to_appear(api: ApiClient) -> None:
    task_id = await computing(api, "sleep 1; echo late > later.txt; sleep 1")
    messages = await follow_all(api, task_id, tail("later.txt", follow=True, wait=True))
    assert [line for batch in messages for line in batch] == ["late"]


async def test_ls_top_and_last_modified(api: ApiClient) -> None:
    task_id = await computing(
        api, "mkdir -p out/deep; echo a > out/deep/x.dat; sleep 0.2; echo b > newest.txt; sleep 30"
    )
    await trio.sleep(0.8)
    listing = await one_shot(api, task_id, Request("ls", False, {}))
    assert {"out": [{"deep": ["x.dat"]}]} in listing
    assert {"newest.txt", "stdout.txt", "stderr.txt"} <= {x for x in listing if isinstance(x, str)}
    top = await one_shot(api, task_id, Request("top", False, {}))
    assert isinstance(top, str)
    assert "PID" in top
    last = await one_shot(api, task_id, Request("last_modified_file", False, {}))
    assert set(last) == {
        "most_recent_file",
        "most_recent_timestamp",
        "now_timestamp",
        "time_since_last_mod",
    }
    assert last["most_recent_file"] in {"newest.txt", "stdout.txt", "stderr.txt"}
    await api.kill(task_id)


async def test_followed_ls_sees_new_files_and_ends_with_the_task(api: ApiClient) -> None:
    task_id = await computing(api, "sleep 1; touch one; sleep 1.5; touch two; sleep 1")
    listings = await follow_all(api, task_id, Request("ls", True, {}))
    names = [{x for x in listing if isinstance(x, str)} for listing in listings]
    assert any("one" in n and "two" not in n for n in names)
    assert "two" in names[-1]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (tail("missing.txt"), "File not found: missing.txt"),
        (tail("../../secret"), ""),
        (tail("/etc/passwd"), ""),
        (tail("binary.dat"), "File is not a text file: binary.dat"),
        (Request("rm", False, {}), ""),
        (Request("tail", False, {"filename": "stdout.txt", "lines": -1}), ""),
    ],
)
async def test_bad_requests_get_a_clear_error(
    api: ApiClient, request_: Request, message: str
) -> None:
    task_id = await computing(api, "head -c 3000 /dev/urandom > binary.dat; sleep 30")
    await trio.sleep(0.3)
    with pytest.raises(LiveError) as caught:
        await one_shot(api, task_id, request_)
    assert message in str(caught.value)
    assert str(caught.value)
    # The connection's failure stopped nothing: the same task still answers.
    assert await one_shot(api, task_id, tail("stdout.txt")) == []
    await api.kill(task_id)


async def test_no_live_channel_for_a_task_that_is_not_computing(api: ApiClient) -> None:
    task_id = await submit_task(api, ["true"])
    await wait_status(api, task_id)
    with pytest.raises(LiveError, match="no live channel"):
        await one_shot(api, task_id, tail("stdout.txt"))


# A refused upload leaves httpx's body iterator unfinished (see test_service_protocol.py).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_signalling_refuses_bad_input(api: ApiClient, http: httpx.AsyncClient) -> None:
    unknown = "0" * 25
    for path in ("register", "offer"):
        answer = await http.post(f"/tasks/{unknown}/{path}", json={"sender_id": "x"})
        assert answer.status_code == 404
    assert (await http.get(f"/tasks/{unknown}/message", params={"client": "x"})).status_code == 404

    task_id = await computing(api, "sleep 30")
    offer = {"sender_id": "me", "receiver_id": task_id, "type": "offer"}
    cases: list[tuple[Any, int]] = [
        ({**offer, "sdp": "not sdp at all"}, 400),
        ({**offer, "sdp": "v=0\r\n"}, 400),
        ({**offer, "type": "answer", "sdp": "v=0"}, 422),
        ({"receiver_id": task_id, "type": "offer", "sdp": "v=0"}, 422),
        ({**offer, "receiver_id": "someone else", "sdp": "v=0"}, 422),
        ([1, 2], 422),
    ]
    for body, code in cases:
        answer = await http.post(f"/tasks/{task_id}/offer", content=json.dumps(body))
        assert answer.status_code == code, (body, answer.text)
        assert answer.json()["detail"]
    # Nothing was left waiting for those senders.
    assert (await http.get(f"/tasks/{task_id}/message", params={"client": "me"})).status_code == 204
    await api.kill(task_id)
    try:  # last: the service may close this connection
        answer = await http.post(f"/tasks/{task_id}/offer", content=b"x" * (300 << 10))
        assert answer.status_code == 413
    except httpx.RemoteProtocolError:
        pass  # refused (413) and closed before the client finished sending: refused too


async def test_kill_ends_a_followed_stream(api: ApiClient) -> None:
    task_id = await computing(api, "while true; do echo tick; sleep 0.1; done")
    connection = LiveConnection(api, task_id)
    got = 0
    try:
        with trio.fail_after(30):
            stream = await connection.connect(tail("stdout.txt", follow=True))
            async for answer in stream:
                got += len(answer.message)
                if got >= 5:
                    await api.kill(task_id)
                    got = -(1 << 20)  # count on; the stream must still end
    finally:
        await connection.aclose()
    assert got < 0


# -- the CLI and the Task class ------------------------------------------------------------------


async def cli(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    done = await trio.run_process(
        [
            *taskfs_cmd(*args),
            "--api-url",
            service.url,
            "--api-key-file",
            str(service.settings.key_file),
        ],
        env=clean_env(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def test_cli_live_commands(api: ApiClient, service: Service) -> None:
    steady = await computing(
        api, "mkdir -p d/e; echo x > d/e/f.dat; seq 1 20; echo oops >&2; sleep 60"
    )
    await trio.sleep(0.5)
    got = await cli(service, "tasks", "tail", steady, "stdout.txt", "-l", "2")
    assert (got.returncode, got.stdout, got.stderr) == (0, "19\n20\n", "")
    got = await cli(service, "tasks", "tail", steady, "stderr.txt", "nope.txt", "stdout.txt")
    assert got.returncode == 1
    assert got.stdout.startswith("==> stderr.txt <==\noops\n\n==> stdout.txt <==\n11\n")
    assert got.stderr == "taskfs: nope.txt: File not found\n"  # the name once
    got = await cli(service, "tasks", "list-files", steady)
    assert got.stdout == "d/\nd/e/\nd/e/f.dat\nstderr.txt\nstdout.txt\n", got.stderr
    got = await cli(service, "tasks", "list-files", steady, "--json")
    assert json.loads(got.stdout) == [{"d": [{"e": ["f.dat"]}]}, "stderr.txt", "stdout.txt"]
    got = await cli(service, "tasks", "last-modified-file", steady)
    assert got.stdout.startswith("Most Recent File: std"), got.stderr
    got = await cli(service, "tasks", "top", steady)
    assert got.returncode == 0 and "PID" in got.stdout
    await api.kill(steady)
    await wait_status(api, steady)
    got = await cli(service, "tasks", "tail", steady, "stdout.txt")
    assert got.returncode == 1
    assert f"task {steady} has ended (killed)" in got.stderr
    assert "Traceback" not in got.stderr

    ticking = await computing(
        api, "sleep 1; for i in $(seq 1 10); do echo out $i; echo err $i >&2; sleep 0.1; done"
    )
    follow = await cli(service, "tasks", "tail", ticking, "stdout.txt", "-f")
    assert follow.stdout == "".join(f"out {i}\n" for i in range(1, 11))
    # A last line without a newline is printed without one, as the file has it.
    partial = await computing(api, "seq 1 3; printf 'no newline'; sleep 3")
    await trio.sleep(0.5)
    once = await cli(service, "tasks", "tail", partial, "stdout.txt", "-l", "2")
    assert once.stdout == "3\nno newline", once.stderr
    follow = await cli(service, "tasks", "tail", partial, "stdout.txt", "-f")
    assert follow.stdout == "1\n2\n3\nno newline", follow.stderr
    ticking = await computing(
        api, "sleep 1; for i in $(seq 1 10); do echo out $i; echo err $i >&2; sleep 0.1; done"
    )
    logs = await cli(service, "logs", ticking)
    assert logs.returncode == 0, logs.stderr
    outs = [x for x in logs.stdout.splitlines() if x.startswith("out")]
    errs = [x for x in logs.stdout.splitlines() if x.startswith("err")]
    assert outs == [f"out {i}" for i in range(1, 11)]
    assert errs == [f"err {i}" for i in range(1, 11)]


LONG_LINE = """
import sys, time
time.sleep(1)
for i in range(3):
    sys.stdout.write("%d" % i + "x" * 2_200_000 + "\\n"); sys.stdout.flush()
    for j in range(20):
        sys.stderr.write("tick %d %d\\n" % (i, j)); sys.stderr.flush(); time.sleep(0.005)
"""


async def test_followed_files_keep_a_long_line_of_one_whole(
    api: ApiClient, service: Service
) -> None:
    """A line longer than one message arrives in pieces; another followed file's lines that
    come between two pieces wait, so the line is printed whole (it was cut by the other file's
    header, seen once with a 2,200,000-character line beside a ticking stderr)."""
    task_id = await computing(api, f"{PY} -c {shlex.quote(LONG_LINE)}")
    got = await cli(service, "tasks", "tail", task_id, "stdout.txt", "stderr.txt", "-f")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.split("\n")
    long = [line for line in lines if len(line) > 1000]
    assert long == [f"{i}" + "x" * 2_200_000 for i in range(3)]
    ticks = [line for line in lines if line.startswith("tick")]
    assert ticks == [f"tick {i} {j}" for i in range(3) for j in range(20)]


async def test_task_live_methods(api: ApiClient, service: Service) -> None:
    task_id = await computing(api, "mkdir d; echo x > d/y; seq 1 5; sleep 60")
    await trio.sleep(0.5)
    task = Task(task_id, settings=service.client_settings)
    out = io.StringIO()
    assert (
        await trio.to_thread.run_sync(lambda: task.tail_files(["stdout.txt"], 2, False, out)) == 0
    )
    assert out.getvalue() == "4\n5\n"
    listing, code = await trio.to_thread.run_sync(task.list_files)
    assert (listing, code) == ("d/\nd/y\nstderr.txt\nstdout.txt\n", 0)
    text, code = await trio.to_thread.run_sync(task._top)
    assert code == 0 and text is not None and "PID" in text
    text, code = await trio.to_thread.run_sync(task.last_modified_file)
    assert code == 0 and text is not None and text.startswith("Most Recent File:")
    await api.kill(task_id)
    await wait_status(api, task_id)
    assert await trio.to_thread.run_sync(task.list_files) == (None, 1)
