"""The API client over httpx.MockTransport: calls, paging, errors, retries, the key's secrecy."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from taskfs.api.client import ApiClient, http_client
from taskfs.api.models import TaskStatusCode
from taskfs.config import ClientSettings
from taskfs.errors import (
    AuthError,
    NotFoundError,
    ProtocolError,
    ServiceError,
    TaskfsError,
    UsageError,
)
from taskfs.retry import RetryPolicy

KEY = "secret-key_123"


def task(i: int) -> dict[str, object]:
    return {
        "task_id": f"t{i}",
        "status": "success",
        "status_alias": "Success",
        "simulator": "s",
        "project": "p",
        "is_terminated": True,
        "num_retries": 0,
        "metrics": {},
    }


def client(handler: Callable[[httpx.Request], httpx.Response], deadline: float = 5.0) -> ApiClient:
    settings = ClientSettings(api_url="http://api.test/prefix", api_key=KEY, deadline=deadline)
    return ApiClient(
        http_client(settings, httpx.MockTransport(handler)), RetryPolicy(deadline=deadline)
    )


async def test_get_status_sends_key_and_user_agent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "id": "t1",
                "status": "submitted",
                "is_terminated": False,
                "position_in_queue": {"tasks_ahead": 3},
            },
        )

    status = await client(handler).get_status("t1")
    assert status.status == TaskStatusCode.SUBMITTED and status.position_in_queue
    assert status.position_in_queue.tasks_ahead == 3
    assert seen[0].url.path == "/prefix/tasks/t1/status"
    assert seen[0].headers["x-api-key"] == KEY
    assert seen[0].headers["user-agent"].startswith("taskfs/")


async def test_paging_stops_without_an_extra_request() -> None:
    pages: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        per_page = int(request.url.params["per_page"])
        pages.append(page)
        items = [task(i) for i in range((page - 1) * per_page, min(1000, page * per_page))]
        return httpx.Response(200, json={"total_size": 1000, "tasks": items})

    ids = [t.task_id async for t in client(handler).iter_tasks()]
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert pages == [1, 2]  # P8: two requests of 500 for 1,000 tasks


async def test_paging_dedupes_shifted_tasks_and_filters() -> None:
    # A new task arrives between the pages: t4 shows up on both.
    responses = iter(
        [
            {"total_size": 6, "tasks": [task(5), task(4), task(3)]},
            {"total_size": 7, "tasks": [task(4), task(2), task(1)]},
            {"total_size": 7, "tasks": [task(0)]},
        ]
    )
    params: list[httpx.QueryParams] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params.append(request.url.params)
        return httpx.Response(200, json=next(responses))

    api = client(handler)
    ids = [t.task_id async for t in api.iter_tasks(status="success", project="p", per_page=3)]
    assert ids == ["t5", "t4", "t3", "t2", "t1", "t0"]
    assert params[0]["status"] == "success" and params[0]["project"] == "p"


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (404, {"detail": "no such task"}, NotFoundError, "not found"),
        (401, {"detail": "bad key"}, AuthError, "access denied"),
        (403, {"detail": "forbidden"}, AuthError, "access denied"),
        (422, {"detail": "per_page too big"}, UsageError, "per_page too big"),
        (409, {"detail": "conflict"}, TaskfsError, "conflict"),
        (200, {"id": "t1"}, ProtocolError, "unexpected answer"),
        (200, "not json", ProtocolError, "unexpected answer"),
    ],
)
async def test_errors_are_typed(
    status: int, body: object, error: type[Exception], message: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, content=body.encode())
        return httpx.Response(status, json=body)

    with pytest.raises(error, match=message) as info:
        await client(handler).get_status("t1")
    assert KEY not in str(info.value)


async def test_retries_honour_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": "2"}, json={"detail": "busy"}),
            httpx.Response(429, json={"detail": "slow down"}),
            httpx.Response(502, text="bad gateway"),
        ]
    )
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise httpx.ReadTimeout("timed out", request=request)
        answer = next(answers, None)
        if answer is None:
            return httpx.Response(200, json={"id": "t1", "status": "killed", "is_terminated": True})
        return answer

    start = trio.current_time()
    status = await client(handler).kill("t1")
    assert status.status == TaskStatusCode.KILLED and calls == 5
    assert trio.current_time() - start >= 2.0


async def test_persistent_failure_ends_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    start = trio.current_time()
    with pytest.raises(ServiceError, match=r"cannot connect to http://api\.test/prefix"):
        await client(handler, deadline=4.0).get_task("t1")
    assert trio.current_time() - start <= 4.0


async def test_retry_after_beyond_the_deadline_fails_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "3600"}, json={"detail": "down"})

    start = trio.current_time()
    with pytest.raises(ServiceError, match="gave up after 1 attempts"):
        await client(handler, deadline=10.0).get_status("t1")
    assert trio.current_time() == start


@pytest.mark.parametrize("max_outage", [3.0, 8.0, 25.0])
async def test_wait_gives_up_when_the_outage_allowance_is_spent_not_a_deadline_later(
    autojump_clock: trio.testing.MockClock, max_outage: float
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "down"})

    outages: list[float] = []
    start = trio.current_time()
    with pytest.raises(ServiceError, match="gave up"):
        await client(handler, deadline=10.0).wait_ended(
            "t1", max_outage=max_outage, on_outage=lambda error, wait: outages.append(wait)
        )
    assert max_outage <= trio.current_time() - start <= max_outage + 0.5
    assert outages  # each retry was told


async def test_submit_is_not_retried_after_it_was_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ReadError("reset", request=request)

    with pytest.raises(ServiceError, match="failed"):
        await client(handler).submit({"simulator": "x"})
    assert calls == 1


async def test_signed_urls_repeat_paths_and_never_carry_the_key_elsewhere() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/storage/signed-urls"):
            paths = request.url.params.get_list("paths")
            return httpx.Response(200, json=[f"http://store/{p}?sig=x" for p in paths])
        return httpx.Response(200)

    api = client(handler)
    urls = await api.signed_urls("upload", ["a/input.zip", "b/input.zip"], "local")
    assert urls == ["http://store/a/input.zip?sig=x", "http://store/b/input.zip?sig=x"]
    assert seen[0].url.params["region"] == "local"
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "input.zip"
        file.write_bytes(b"zipdata")
        await api.upload_file(urls[0], file)
    put = seen[-1]
    assert put.method == "PUT" and put.url.host == "store"
    assert "x-api-key" not in put.headers
    assert put.headers["content-type"] == "application/octet-stream"


async def test_key_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"detail": "boom"})

    with pytest.raises(ServiceError):
        await client(handler, deadline=0.3).get_status("t1")
    text = "\n".join(r.getMessage() + json.dumps(r.args, default=str) for r in caplog.records)
    assert caplog.records and KEY not in text


@pytest.mark.parametrize("bad", ["../version-check", "a/b", "id?x", "id#frag", "", "a" * 65])
async def test_task_ids_are_checked_and_never_reach_another_endpoint(bad: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    api = client(handler)
    for call in (api.get_task, api.get_status, api.kill, api.input_uploaded):
        with pytest.raises(UsageError, match="not a task id"):
            await call(bad)
    assert seen == []
