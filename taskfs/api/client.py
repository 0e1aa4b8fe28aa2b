"""Async client of the task REST API over one injected ``httpx.AsyncClient``.

Owns: every call taskfs makes to the API (TASK_API.md section 3), their timeouts, retries and
deadline, and the translation of HTTP outcomes into the typed errors of ``taskfs.errors``.

Must stay true:
* every call ends by its deadline (``RetryPolicy.deadline``); idempotent calls are retried on
  connection errors, timeouts, 429 and 5xx with jittered backoff honouring ``Retry-After``; a
  submit is retried only when the request never reached the server;
* httpx exceptions never leave this module: they become ``ServiceError``/``ProtocolError``/...
  chained to their cause;
* the API key travels only in the ``X-API-Key`` header of requests to the API's own base URL
  (never to signed URLs) and appears in no message or log record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec
import trio

from taskfs import __version__
from taskfs.api.models import (
    SubmitResponse,
    Task,
    TaskPage,
    TaskStatus,
    TaskStatusCode,
    TaskWithStatusHistory,
    ZipArchiveInfo,
    is_task_id,
)
from taskfs.config import ClientSettings, local_service_url
from taskfs.errors import (
    AuthError,
    NotFoundError,
    ProtocolError,
    ServiceError,
    TaskEndedError,
    TaskfsError,
    UsageError,
)
from taskfs.retry import (
    RETRY_STATUSES,
    Breaker,
    Retryable,
    RetryPolicy,
    operation_budget,
    retry_after_seconds,
    with_retries,
)
from taskfs.tls import tls_context

log = logging.getLogger(__name__)
T = TypeVar("T")

USER_AGENT = f"taskfs/{__version__}"
PAGE_SIZE = 500


def _task_path(task_id: str, action: str | None = None) -> str:
    """``/tasks/<id>[/<action>]`` for a checked id (``UsageError`` otherwise), encoded as one
    path segment: an id never reaches another endpoint or carries a query."""
    if not is_task_id(task_id):
        raise UsageError(f"not a task id: {task_id!r}")
    path = f"/tasks/{quote(task_id, safe='')}"
    return f"{path}/{action}" if action else path


def transport_message(exc: httpx.TransportError, base: str) -> str:
    """A short human account of a transport failure (no headers, so no key)."""
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {base.rstrip('/')}"
    if isinstance(exc, httpx.TimeoutException):
        return f"{base.rstrip('/')} did not answer in time ({type(exc).__name__})"
    return f"connection to {base.rstrip('/')} failed ({type(exc).__name__}: {exc})"


def detail_of(response: httpx.Response) -> str:
    """The ``detail`` of an error body, or a short excerpt of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:200]


def http_client(
    settings: ClientSettings,
    transport: httpx.AsyncBaseTransport | None = None,
    max_connections: int = 16,
) -> httpx.AsyncClient:
    """The ``httpx.AsyncClient`` taskfs uses for the API: base URL, key header, timeouts."""
    return httpx.AsyncClient(
        base_url=settings.api_url,
        headers={"X-API-Key": settings.api_key, "User-Agent": USER_AGENT},
        timeout=httpx.Timeout(
            settings.read_timeout, connect=settings.connect_timeout, pool=settings.deadline
        ),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        transport=transport,
        follow_redirects=False,
        verify=tls_context(),
    )


class ApiClient:
    """Calls of the task API. Create with ``ApiClient.open(settings)`` or inject ``http``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        policy: RetryPolicy | None = None,
        rediscover: Callable[[], str | None] | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.http = http
        self.policy = policy or RetryPolicy()
        # Set for a mount: after one call runs out of time, fail the next at once until the
        # service answers again (a command-line client waits out each call instead).
        self.breaker = breaker
        # Where the service is now, asked when it stops answering (the local service).
        self._rediscover = rediscover

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: ClientSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        breaker: Breaker | None = None,
    ) -> AsyncIterator[ApiClient]:
        """A client for ``settings``; ``transport`` replaces the network (tests)."""
        data_dir = settings.local_data_dir
        rediscover = (lambda: local_service_url(data_dir)) if data_dir is not None else None
        async with http_client(settings, transport) as http:
            yield cls(http, RetryPolicy(deadline=settings.deadline), rediscover, breaker)

    # -- the calls -----------------------------------------------------------------------------

    async def version_check(self) -> dict[str, Any]:
        return await self._json(
            "GET", "/version-check", dict[str, Any], params={"client_version": __version__}
        )

    async def list_page(
        self,
        page: int,
        per_page: int = PAGE_SIZE,
        status: TaskStatusCode | str | None = None,
        project: str | None = None,
    ) -> TaskPage:
        params: dict[str, Any] = {"page": page, "per_page": per_page}
        if status is not None:
            params["status"] = str(status)
        if project is not None:
            params["project"] = project
        return await self._json("GET", "/tasks", TaskPage, params=params)

    async def iter_tasks(
        self,
        status: TaskStatusCode | str | None = None,
        project: str | None = None,
        per_page: int = PAGE_SIZE,
        limit: int | None = None,
    ) -> AsyncIterator[Task]:
        """All tasks, newest first, page by page; a task shifted across pages comes once."""
        seen: set[str] = set()
        page = 1
        while True:
            result = await self.list_page(page, per_page, status, project)
            for task in result.tasks:
                if task.task_id not in seen:
                    seen.add(task.task_id)
                    yield task
                    if limit is not None and len(seen) >= limit:
                        return
            if len(result.tasks) < per_page or page * per_page >= result.total_size:
                return
            page += 1

    async def get_task(self, task_id: str) -> TaskWithStatusHistory:
        return await self._json(
            "GET", _task_path(task_id), TaskWithStatusHistory, what=f"task {task_id}"
        )

    async def get_task_raw(self, task_id: str) -> tuple[TaskWithStatusHistory, bytes]:
        """The task and the exact JSON the API sent (``info.json`` shows it as is)."""
        raw = await self._call("GET", _task_path(task_id), what=f"task {task_id}")
        return self._decode(raw, TaskWithStatusHistory, f"GET /tasks/{task_id}"), raw

    async def get_status(self, task_id: str) -> TaskStatus:
        return await self._json(
            "GET", _task_path(task_id, "status"), TaskStatus, what=f"task {task_id}"
        )

    async def kill(self, task_id: str) -> TaskStatus:
        # A kill is safe to repeat: a second one answers the current status.
        return await self._json(
            "POST", _task_path(task_id, "kill"), TaskStatus, what=f"task {task_id}"
        )

    async def kill_running(self, task_id: str) -> TaskStatusCode:
        """Kill a task that has not ended; ``TaskEndedError`` (ESRCH) if it has.

        The API answers a kill of an ended task with its unchanged status, so a task that is
        ``killed`` already is told apart from one killed now by asking for its status first.
        A task whose commands have ended (``computation-ended``: its outputs are being packed)
        has nothing left to kill; the embedded service answers with that status and the task
        keeps its real end state, so that too is ``TaskEndedError``.
        """
        before = await self.get_status(task_id)
        if before.is_terminated:
            raise TaskEndedError(f"task {task_id} has already ended ({before.status})")
        answer = await self.kill(task_id)
        if answer.is_terminated and answer.status != TaskStatusCode.KILLED:
            raise TaskEndedError(f"task {task_id} has already ended ({answer.status})")
        if answer.status == TaskStatusCode.COMPUTATION_ENDED:
            # The service kept the task: its commands have ended, its outputs are being saved.
            raise TaskEndedError(f"task {task_id} has finished computing ({answer.status})")
        return answer.status

    async def wait_ended(
        self,
        task_id: str,
        poll: float = 1.0,
        on_change: Callable[[TaskStatus], None] | None = None,
        *,
        max_outage: float | None = None,
        on_outage: Callable[[ServiceError, float], None] | None = None,
    ) -> TaskStatus:
        """Poll until the task has ended; ``on_change`` sees each new status as it comes.

        An outage of the service (``ServiceError``: unreachable, timing out, 5xx) is ridden
        out: ``on_outage(error, seconds)`` hears of each retry, spaced 1, 2, 4 ... 30 s apart;
        the outage's error is raised once it has lasted ``max_outage`` seconds (never, if
        ``None``). Anything else (an unknown task, a rejected key) is raised at once.
        """
        last: TaskStatusCode | None = None
        outage_since: float | None = None
        backoff = 1.0
        while True:
            asked = trio.current_time()
            # No call outlasts what is left of the outage allowance (a call that fails first
            # has already been part of the outage).
            left = math.inf
            if max_outage is not None:
                left = max_outage - (asked - (asked if outage_since is None else outage_since))
            try:
                with operation_budget(max(0.1, left)):
                    status = await self.get_status(task_id)
            except ServiceError as exc:
                now = trio.current_time()
                outage_since = asked if outage_since is None else outage_since
                if max_outage is not None and now - outage_since >= max_outage:
                    raise ServiceError(
                        f"{exc} (unreachable for {now - outage_since:.0f} s; gave up)"
                    ) from exc
                if max_outage is not None:
                    backoff = min(backoff, max(0.1, outage_since + max_outage - now))
                if on_outage is not None:
                    on_outage(exc, backoff)
                await trio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            outage_since, backoff = None, 1.0
            if status.status != last and on_change is not None:
                on_change(status)
            last = status.status
            if status.is_terminated:
                return status
            await trio.sleep(poll)

    async def submit(self, request: Mapping[str, Any]) -> SubmitResponse:
        return await self._json(
            "POST", "/tasks/submit", SubmitResponse, json=dict(request), idempotent=False
        )

    async def input_uploaded(self, task_id: str) -> None:
        await self._json(
            "POST",
            _task_path(task_id, "input_uploaded"),
            dict[str, Any],
            what=f"task {task_id}",
        )

    async def signed_urls(
        self, operation: str, paths: Sequence[str], region: str | None = None
    ) -> list[str]:
        params: list[tuple[str, str]] = [("operation", operation)]
        params += [("paths", p) for p in paths]
        if region:
            params.append(("region", region))
        urls = await self._json("GET", "/storage/signed-urls", list[str], params=params)
        if len(urls) != len(paths):
            raise ProtocolError(f"asked for {len(paths)} signed URLs, got {len(urls)}")
        return urls

    async def download_url(self, path: str, region: str | None = None) -> str:
        return (await self.signed_urls("download", [path], region))[0]

    async def zip_contents(
        self, path: str, relative: str = "artifacts/", recursive: bool = True
    ) -> ZipArchiveInfo:
        params = {
            "path": path,
            "zip_relative_path": relative,
            "recursive": "true" if recursive else "false",
        }
        return await self._json("GET", "/storage/zip-contents", ZipArchiveInfo, params=params)

    async def upload_file(self, url: str, file: Path) -> None:
        """PUT a local file to a signed upload URL (no API key on that request)."""
        size = (await trio.Path(file).stat()).st_size

        async def body() -> AsyncIterator[bytes]:
            async with await trio.open_file(file, "rb") as f:
                while chunk := await f.read(1 << 20):
                    yield chunk

        async def attempt() -> None:
            request = self.http.build_request(
                "PUT",
                url,
                content=body(),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                timeout=httpx.Timeout(60.0, connect=self.http.timeout.connect),
            )
            del request.headers["X-API-Key"]  # signed URLs carry their own authority
            try:
                response = await self.http.send(request)
            except httpx.TransportError as exc:
                raise Retryable(f"upload failed: {type(exc).__name__}: {exc}") from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise ProtocolError(f"upload: {type(exc).__name__}: {exc}") from exc
            self._check(response, "upload")

        await with_retries(
            attempt, RetryPolicy(deadline=max(self.policy.deadline, 300.0)), "upload"
        )

    # -- plumbing ------------------------------------------------------------------------------

    async def live_signal(self, task_id: str, sender: str, sdp: str) -> str | None:
        """The live channel's signalling (TASK_API.md "Live channel"): register ``sender``,
        send its offer, fetch the answer. The answer's SDP, or None when the task has no live
        channel (204: not computing, or a service without one; 404 from ``register`` or
        ``offer``: a service without the endpoints)."""
        what = f"live channel of task {task_id}"
        offer = {"sender_id": sender, "receiver_id": task_id, "type": "offer", "sdp": sdp}
        try:
            await self._call(
                "POST", _task_path(task_id, "register"), json={"sender_id": sender}, what=what
            )
            await self._call("POST", _task_path(task_id, "offer"), json=offer, what=what)
        except NotFoundError:  # a service without the endpoints (or the task is gone)
            return None
        raw = await self._call(
            "GET", _task_path(task_id, "message"), params={"client": sender}, what=what
        )
        if not raw.strip():
            return None
        answer = self._decode(raw, dict[str, Any], f"GET {_task_path(task_id, 'message')}")
        if answer.get("type") != "answer" or not isinstance(answer.get("sdp"), str):
            raise ProtocolError(f"{what}: the service answered the offer with no answer")
        return str(answer["sdp"])

    async def _json(
        self,
        method: str,
        path: str,
        type_: type[T],
        *,
        params: Any = None,
        json: Any = None,
        idempotent: bool = True,
        what: str | None = None,
    ) -> T:
        raw = await self._call(
            method, path, params=params, json=json, idempotent=idempotent, what=what
        )
        return self._decode(raw, type_, f"{method} {path}")

    def _moved(self) -> bool:
        """Follow the local service to its new address, if it has one."""
        if self._rediscover is None:
            return False
        url = self._rediscover()
        if url is None or url.rstrip("/") == str(self.http.base_url).rstrip("/"):
            return False
        log.info("the local service moved to %s", url)
        self.http.base_url = httpx.URL(url)
        return True

    @staticmethod
    def _decode(raw: bytes, type_: type[T], name: str) -> T:
        try:
            return msgspec.json.decode(raw, type=type_)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ProtocolError(f"{name}: unexpected answer: {exc}") from exc

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        idempotent: bool = True,
        what: str | None = None,
    ) -> bytes:
        """One API call with retries; the body of its 2xx answer."""
        name = f"{method} {path}"

        async def attempt() -> bytes:
            try:
                response = await self.http.request(method, path, params=params, json=json)
            except httpx.TransportError as exc:
                message = transport_message(exc, str(self.http.base_url))
                if isinstance(exc, httpx.ConnectError) and self._moved():
                    raise Retryable(f"{message}; the service moved", retry_after=0.0) from exc
                if idempotent or isinstance(exc, httpx.ConnectError):
                    raise Retryable(message) from exc
                raise ServiceError(f"{name}: {message}") from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise ProtocolError(f"{name}: {type(exc).__name__}: {exc}") from exc
            if response.status_code in RETRY_STATUSES and idempotent:
                raise Retryable(
                    f"HTTP {response.status_code}: {detail_of(response)}",
                    retry_after_seconds(response.headers.get("retry-after")),
                )
            self._check(response, what or name)
            return response.content

        return await with_retries(attempt, self.policy, name, self.breaker)

    @staticmethod
    def _check(response: httpx.Response, what: str) -> None:
        code = response.status_code
        if 200 <= code < 300:
            return
        detail = detail_of(response)
        if code in (401, 403):
            raise AuthError(f"{what}: access denied ({code}): {detail}")
        if code == 404:
            raise NotFoundError(f"{what}: not found")
        if code == 422:
            raise UsageError(f"{what}: rejected by the service: {detail}")
        if code >= 500:
            raise ServiceError(f"{what}: service error {code}: {detail}")
        raise TaskfsError(f"{what}: HTTP {code}: {detail}")
