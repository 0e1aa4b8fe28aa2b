"""The REST API of the embedded service (TASK_API.md sections 1-5) and its lifecycle.

Owns: the Starlette app (routes, API-key check, JSON errors, query/body validation), the JSON
shape of every response, signed-URL object serving (ranges, ETag, ``If-Match``, ``If-Range``),
and ``serve()``, which lays out the service's lifetimes: key files, data-dir lock, store,
runner and Hypercorn (trio worker) in one nursery.

Must stay true:
* every error is ``{"detail": "..."}`` with a JSON content type; unknown ids are 404, a missing
  or wrong key 401, malformed parameters or bodies 422;
* timestamps leave the server with an explicit ``+00:00`` offset; ``metrics`` is always an
  object; ``status_history`` is never empty;
* signed URLs are built from the base URL the request arrived on (a proxy in front keeps
  working) and checked for operation, path and expiry before any file is touched;
* the API key is compared in constant time and never logged.
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import json
import logging
import os
import secrets
import stat
import struct
import time
import zipfile
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from taskfs import __version__
from taskfs.api.models import (
    STATUS_ALIASES,
    TERMINAL,
    TaskStatusCode,
    format_time,
    is_task_id,
    now_utc,
)
from taskfs.config import (
    KEY_CHARSET,
    SERVICE_LOCK_NAME,
    ServiceSettings,
    local_service_pid,
    local_service_url,
    make_dirs,
)
from taskfs.errors import UsageError
from taskfs.live.protocol import LiveBusyError, OfferError
from taskfs.server.reaper import become_subreaper
from taskfs.server.runner import Runner, StatusHook
from taskfs.server.storage import Storage, check_storage_path
from taskfs.server.store import Store

if TYPE_CHECKING:
    from taskfs.live.answerer import LiveHub

log = logging.getLogger(__name__)
S = TaskStatusCode

API_KEY_HEADER = "x-api-key"
OBJECTS_PREFIX = "/storage/objects/"
PUBLIC_PATHS = ("/version-check",)
MAX_PER_PAGE = 500
# A task request is a few KiB; a larger body is refused before it is read (413).
MAX_REQUEST_BODY = 1 << 20
MAX_SIGNAL_BODY = 256 << 10  # an SDP offer is about 1 KB; candidates add a line each
# One command is passed to ``sh -c`` as one argument: the kernel takes at most 128 KiB.
MAX_COMMAND = 100_000

_OPERATION_ALIASES = {
    "exec_command": "Running command",
    "download_container": "Downloading container",
    "download_input": "Downloading input",
    "uncompress_input": "Uncompressing input",
    "compress_output": "Compressing output",
    "upload_output": "Uploading output",
}


class TaskRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Body of ``POST /tasks/submit``; fields without defaults must be present."""

    simulator: str
    resource_pool: str | None
    container_image: str | None
    project: str | None = None
    storage_path_prefix: str | None = None
    time_to_live_seconds: float | None = None
    resubmit_on_preemption: bool | None = None
    input_resources: list[str] | None = None
    stream_zip: bool | None = None
    compress_with: str | None = None
    extra_params: dict[str, Any] | None = None


class LiveSignal(msgspec.Struct):
    sender_id: str
    receiver_id: str | None = None
    type: str | None = None
    sdp: str | None = None


class Command(msgspec.Struct):
    cmd: str
    prompts: list[str] = msgspec.field(default_factory=list)


class JSON(Response):
    """A JSON response encoded by msgspec."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


class ObjectResponse(FileResponse):
    """FileResponse with 1 MiB chunks (fewer thread hops per byte served)."""

    chunk_size = 1 << 20


def error(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


# -- rendering -----------------------------------------------------------------------------------


def render_task(row: dict[str, Any]) -> dict[str, Any]:
    """A ``Task`` (list item) from a store row."""
    status = S(row["status"])
    request = row["request"]
    storage_path = row["storage_path"]
    return {
        "task_id": row["task_id"],
        "status": status.value,
        "status_alias": STATUS_ALIASES[status],
        "simulator": row["simulator"],
        "project": row["project"],
        "is_terminated": status in TERMINAL,
        "num_retries": 0,
        "storage_path": storage_path,
        "storage_input_path": f"{storage_path}/input.zip",
        "storage_output_path": f"{storage_path}/output.zip",
        "storage_region": row["storage_region"],
        "container_image": row["container_image"],
        "create_time": row["create_time"],
        "input_submit_time": row["input_submit_time"],
        "start_time": row["start_time"],
        "computation_start_time": row["computation_start_time"],
        "computation_end_time": row["computation_end_time"],
        "end_time": row["end_time"],
        "duration_seconds": (row["metrics"] or {}).get("total_seconds"),
        "estimated_computation_cost": None,
        "metrics": row["metrics"] or {},
        "executer": row["executer"],
        "machine_group_name": request.get("resource_pool"),
        "machine_group_id": request.get("resource_pool"),
        "error_detail": row["error_detail"],
        "input_resources": request.get("input_resources"),
        "stream_zip": request.get("stream_zip"),
        "compress_with": request.get("compress_with"),
        "task_metadata": None,
        "extra_params": request.get("extra_params"),
        "resubmit_on_preemption": request.get("resubmit_on_preemption") or False,
        "orchestration_fee": None,
    }


def render_history(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "machine_id": entry["machine_id"],
            "status": entry["status"],
            "timestamp": entry["timestamp"],
            "end_timestamp": entry["end_timestamp"],
            "description": entry["description"],
            "alias": STATUS_ALIASES[S(entry["status"])],
            "operations": [
                {
                    "name": op["name"],
                    "alias": _OPERATION_ALIASES.get(op["name"], op["name"]),
                    "start_timestamp": op["start_timestamp"],
                    "end_timestamp": op["end_timestamp"],
                    "status": op["status"],
                    "attributes": op["attributes"],
                }
                for op in entry["operations"]
            ],
        }
        for entry in entries
    ]


def render_status(task_id: str, status: TaskStatusCode, tasks_ahead: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": task_id,
        "status": status.value,
        "is_terminated": status in TERMINAL,
    }
    if tasks_ahead is not None:
        body["position_in_queue"] = {"tasks_ahead": tasks_ahead}
    return body


# -- parameters ----------------------------------------------------------------------------------


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise error(422, f"query parameter {name!r} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise error(422, f"query parameter {name!r} must be between {low} and {high}")
    return value


def str_param(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if value is None or value == "":
        raise error(422, f"query parameter {name!r} is required")
    return value


def bool_param(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise error(422, f"query parameter {name!r} must be true or false, got {raw!r}")


def storage_path_param(request: Request, name: str) -> str:
    value = str_param(request, name)
    try:
        return check_storage_path(value)
    except ValueError as exc:
        raise error(422, str(exc)) from None


def task_id_of(request: Request) -> str:
    task_id: str = request.path_params["task_id"]
    if not is_task_id(task_id):
        raise error(404, f"task {task_id!r} not found")
    return task_id


# -- the application -----------------------------------------------------------------------------


class Service:
    """Routes bound to one store, storage and runner."""

    def __init__(
        self,
        settings: ServiceSettings,
        store: Store,
        storage: Storage,
        runner: Runner,
        live: LiveHub | None = None,
    ) -> None:
        self.live = live
        self.settings = settings
        self.store = store
        self.storage = storage
        self.runner = runner

    async def _task_row(self, task_id: str) -> dict[str, Any]:
        row = await self.store.call(self.store.get_task, task_id)
        if row is None:
            raise error(404, f"task {task_id!r} not found")
        return row

    async def version_check(self, request: Request) -> Response:
        client_version = request.query_params.get("client_version", "")
        return JSON(
            {
                "is_valid": True,
                "client_version": client_version,
                "server_version": __version__,
                "min_supported_client_version": None,
            }
        )

    async def list_tasks(self, request: Request) -> Response:
        page = int_param(request, "page", 1, 1, 1 << 31)
        per_page = int_param(request, "per_page", 10, 1, MAX_PER_PAGE)
        status = request.query_params.get("status")
        if status is not None and status not in {s.value for s in S}:
            raise error(422, f"unknown status {status!r}")
        project = request.query_params.get("project") or None
        total, rows = await self.store.call(
            self.store.list_tasks,
            offset=(page - 1) * per_page,
            limit=per_page,
            status=status,
            project=project,
        )
        return JSON({"total_size": total, "tasks": [render_task(r) for r in rows]})

    async def get_task(self, request: Request) -> Response:
        task_id = task_id_of(request)
        found = await self.store.call(self.store.get_task_with_history, task_id)
        if found is None:
            raise error(404, f"task {task_id!r} not found")
        row, history = found
        body = render_task(row)
        body["status_history"] = render_history(history)
        body["machine_operations"] = []
        return JSON(body)

    async def get_status(self, request: Request) -> Response:
        task_id = task_id_of(request)
        row = await self._task_row(task_id)
        status = S(row["status"])
        ahead = None
        if status == S.SUBMITTED:
            ahead = await self.store.call(self.store.tasks_ahead, task_id)
        return JSON(render_status(task_id, status, ahead))

    async def kill(self, request: Request) -> Response:
        task_id = task_id_of(request)
        status = await self.runner.kill(task_id)
        if status is None:
            raise error(404, f"task {task_id!r} not found")
        ahead = None
        if status == S.SUBMITTED:
            ahead = await self.store.call(self.store.tasks_ahead, task_id)
        return JSON(render_status(task_id, status, ahead))

    async def submit(self, request: Request) -> Response:
        body = await _limited_body(request, MAX_REQUEST_BODY)
        try:
            req = msgspec.json.decode(body, type=TaskRequest)
        except msgspec.ValidationError as exc:
            raise error(422, f"invalid task request: {exc}") from None
        except (msgspec.DecodeError, RecursionError) as exc:
            raise error(422, f"request body is not valid JSON: {exc}") from None
        extra = req.extra_params or {}
        try:
            commands = msgspec.convert(extra.get("commands", []), list[Command])
        except msgspec.ValidationError as exc:
            raise error(422, f"invalid extra_params.commands: {exc}") from None
        for command in commands:
            if "\0" in command.cmd:
                raise error(422, "a command must not contain a NUL character")
            if len(command.cmd.encode()) > MAX_COMMAND:
                raise error(422, f"a command may be at most {MAX_COMMAND} bytes long")
        if req.time_to_live_seconds is not None and req.time_to_live_seconds <= 0:
            raise error(422, "time_to_live_seconds must be positive")
        prefix = (req.storage_path_prefix or "").strip("/")
        if prefix:
            try:
                check_storage_path(prefix)
                # The task's archives must have valid paths too (length, name length).
                check_storage_path(f"{prefix}/{'x' * 25}/output.zip")
            except ValueError as exc:
                raise error(422, str(exc)) from None
        project = req.project or "default"
        request_fields = msgspec.to_builtins(req)
        request_fields["extra_params"] = {
            **extra,
            "commands": [msgspec.to_builtins(c) for c in commands],
        }
        task_id = await self.store.call(
            self.store.create_task,
            project=project,
            simulator=req.simulator,
            container_image=req.container_image,
            resource_pool=req.resource_pool,
            storage_prefix=prefix,
            storage_region=self.settings.storage_region,
            ttl_seconds=req.time_to_live_seconds,
            request=request_fields,
        )
        log.info("task %s created in project %s", task_id, project)
        return JSON(
            {
                "id": task_id,
                "status": S.PENDING_INPUT.value,
                "is_terminated": False,
                "storage_region": self.settings.storage_region,
                "time_to_live_seconds": req.time_to_live_seconds,
            },
            status_code=202,
        )

    async def input_uploaded(self, request: Request) -> Response:
        task_id = task_id_of(request)
        row = await self._task_row(task_id)
        metrics = dict(row["metrics"] or {})
        with suppress(OSError, ValueError):
            archive = self.storage.resolve(f"{row['storage_path']}/input.zip")
            metrics["input_zipped_size_bytes"] = archive.stat().st_size
        result = await self.store.call(
            self.store.transition,
            task_id,
            S.SUBMITTED,
            "Input uploaded; waiting for a machine",
            expect={S.PENDING_INPUT},
            fields={"input_submit_time": format_time(now_utc()), "metrics": metrics},
        )
        if not result.done:
            status = result.status.value if result.status else "unknown"
            raise error(409, f"task {task_id} is {status}, not pending-input")
        self.runner.wake()
        return JSON({})

    async def signed_urls(self, request: Request) -> Response:
        operation = str_param(request, "operation")
        if operation not in ("download", "upload"):
            raise error(422, "operation must be 'download' or 'upload'")
        paths = request.query_params.getlist("paths")
        if not paths:
            raise error(422, "query parameter 'paths' is required")
        urls = []
        base = str(request.base_url).rstrip("/")
        for path in paths:
            try:
                clean = check_storage_path(path)
                self.storage.resolve(clean)
            except ValueError as exc:
                raise error(422, str(exc)) from None
            if operation == "upload":
                refusal = await self.store.call(self.store.upload_refusal, clean)
                if refusal is not None:
                    raise error(403, refusal)
            expires, sig = self.storage.sign(operation, clean, self.settings.signed_url_ttl_seconds)
            query = urlencode({"op": operation, "expires": expires, "sig": sig})
            urls.append(f"{base}{OBJECTS_PREFIX}{quote(clean)}?{query}")
        return JSON(urls)

    async def zip_contents(self, request: Request) -> Response:
        path = storage_path_param(request, "path")
        relative = request.query_params.get("zip_relative_path", "")
        recursive = bool_param(request, "recursive", False)
        try:
            info = await trio.to_thread.run_sync(
                self.storage.zip_contents, path, relative, recursive
            )
        except FileNotFoundError:
            raise error(404, f"no object at {path}") from None
        except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
            raise error(422, f"{path} is not a readable ZIP archive: {exc}") from None
        return JSON(info)

    async def zip_file_range(self, request: Request) -> Response:
        path = storage_path_param(request, "path")
        relative = request.query_params.get("zip_relative_path", "")
        filename = str_param(request, "filename")
        try:
            info = await trio.to_thread.run_sync(
                self.storage.zip_file_range, path, relative, filename
            )
        except FileNotFoundError:
            raise error(404, f"no object at {path}") from None
        except KeyError:
            raise error(404, f"no member {filename!r} in {path}") from None
        except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
            raise error(422, f"{path} is not a readable ZIP archive: {exc}") from None
        return JSON(info)

    async def user_info(self, request: Request) -> Response:
        return JSON(
            {
                "email": "local@localhost",
                "username": "local",
                "name": "Local user",
                "organization": None,
                "tier": "local",
                "total_available_credits": 0,
                "credits_currency": "USD",
                "terms_and_conditions_decision": "accepted",
                "terms_and_conditions_decision_ts": None,
                "extra_metadata": None,
                "registration_ts": format_time(now_utc()),
                "costs_fee_percentage": 0,
                "terminate_resources_credits_threshold": 0,
                "country": None,
                "region": None,
                "discord_handle": None,
            }
        )

    async def user_quotas(self, request: Request) -> Response:
        return JSON({})

    async def user_costs(self, request: Request) -> Response:
        month = now_utc().strftime("%Y-%m")
        return JSON(
            {
                "currency": "USD",
                "credits": 0,
                "costs": [
                    {
                        "month": month,
                        "total": 0,
                        "components": {
                            "compute": 0,
                            "storage": 0,
                            "data_transfer": 0,
                            "task_orchestration": 0,
                        },
                        "type": "estimate",
                    }
                ],
            }
        )

    async def user_fees(self, request: Request) -> Response:
        fee = {"amount": 0, "active": False, "active_since": None, "unit": "percentage"}
        return JSON({"costs_fee_percentage": fee, "task_orchestration_fee": fee})

    # -- live channel (signalling only; the files travel over WebRTC, see taskfs.live) --------

    async def _live_body(self, request: Request) -> tuple[str, LiveSignal]:
        task_id = task_id_of(request)
        body = await _limited_body(request, MAX_SIGNAL_BODY)
        try:
            signal = msgspec.json.decode(body, type=LiveSignal)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            raise error(422, f"invalid body: {exc}") from None
        if not 0 < len(signal.sender_id) <= 128:
            raise error(422, "sender_id must be 1 to 128 characters")
        await self._task_row(task_id)
        return task_id, signal

    async def live_register(self, request: Request) -> Response:
        _, signal = await self._live_body(request)
        return JSON({"sender_id": signal.sender_id})

    async def live_offer(self, request: Request) -> Response:
        task_id, signal = await self._live_body(request)
        if signal.type != "offer" or not signal.sdp:
            raise error(422, "an offer needs type 'offer' and an sdp")
        if signal.receiver_id not in (None, task_id):
            raise error(422, f"receiver_id must be the task id {task_id}")
        if self.live is None:
            return JSON({"sender_id": signal.sender_id})
        try:
            await self.live.offer(task_id, signal.sender_id, signal.sdp)
        except OfferError as exc:
            raise error(400, str(exc)) from None
        except LiveBusyError as exc:
            raise error(503, str(exc)) from None
        return JSON({"sender_id": signal.sender_id})

    async def live_message(self, request: Request) -> Response:
        task_id = task_id_of(request)
        client = request.query_params.get("client")
        request.query_params.get("block_s")  # long polling: answers are ready at once
        await self._task_row(task_id)
        answer = None
        if self.live is not None and client:
            answer = self.live.take_answer(task_id, client)
        if answer is None:
            return Response(status_code=204)
        return JSON({"type": "answer", "sdp": answer, "sender_id": task_id})

    # -- signed objects ------------------------------------------------------------------------

    async def object(self, request: Request) -> Response:
        path = request.path_params["path"]
        want = "upload" if request.method == "PUT" else "download"
        query = request.query_params
        if query.get("op") != want:
            raise error(403, f"this URL is not signed for {want}")
        reason = self.storage.verify(want, path, query.get("expires", ""), query.get("sig", ""))
        if reason is not None:
            raise error(403, reason)
        try:
            file = self.storage.resolve(path)
        except ValueError as exc:
            raise error(403, str(exc)) from None
        if request.method == "PUT":
            return await self._put_object(request, path, file)
        try:
            st = await trio.to_thread.run_sync(os.stat, file)
        except FileNotFoundError:
            raise error(404, f"no object at {path}") from None
        if not stat.S_ISREG(st.st_mode):
            raise error(404, f"no object at {path}")
        etag = Storage.etag(st)
        if_match = request.headers.get("if-match")
        if if_match is not None and not _etag_matches(if_match, etag):
            return JSON(
                {"detail": "ETag does not match If-Match"}, status_code=412, headers={"etag": etag}
            )
        return ObjectResponse(
            file,
            stat_result=st,
            headers={"etag": etag, "cache-control": "private, max-age=0"},
            media_type="application/zip" if path.endswith(".zip") else None,
        )

    async def _put_object(self, request: Request, path: str, file: Path) -> Response:
        refusal = await self.store.call(self.store.upload_refusal, check_storage_path(path))
        if refusal is not None:
            raise error(403, refusal)
        try:
            return await self._store_upload(request, file)
        except OSError as exc:  # a directory there, a file where a directory should be, ...
            raise error(409, f"cannot store an object at {path}: {exc.strerror}") from None

    async def _store_upload(self, request: Request, file: Path) -> Response:
        if await trio.Path(file).is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        await trio.Path(file.parent).mkdir(parents=True, exist_ok=True)
        tmp = file.parent / f".upload-{secrets.token_hex(8)}"
        try:
            async with await trio.open_file(tmp, "wb") as out:
                async for chunk in request.stream():
                    await out.write(chunk)
                await out.flush()
                await trio.to_thread.run_sync(os.fsync, out.fileno())
            await trio.to_thread.run_sync(os.replace, tmp, file)
        finally:
            with trio.CancelScope(shield=True), suppress(FileNotFoundError):
                await trio.to_thread.run_sync(os.unlink, tmp)
        return Response(status_code=200)


async def _limited_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to be longer than ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise error(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise error(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _etag_matches(header: str, etag: str) -> bool:
    candidates = [c.strip() for c in header.split(",")]
    return "*" in candidates or etag in candidates


class KeyCheck:
    """ASGI middleware: every path except the public ones needs the ``X-API-Key`` header."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if not path.startswith(OBJECTS_PREFIX) and path not in PUBLIC_PATHS:
                given = dict(scope["headers"]).get(API_KEY_HEADER.encode(), b"")
                if not given:
                    await JSON({"detail": "missing X-API-Key header"}, status_code=401)(
                        scope, receive, send
                    )
                    return
                if not hmac.compare_digest(given, self._key):
                    await JSON({"detail": "invalid API key"}, status_code=401)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSON({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSON({"detail": "internal server error"}, status_code=500)


def create_app(  # noqa: PLR0917 - the service's parts, built by serve()
    settings: ServiceSettings,
    store: Store,
    storage: Storage,
    runner: Runner,
    api_key: str,
    live: LiveHub | None = None,
) -> ASGIApp:
    service = Service(settings, store, storage, runner, live)
    routes = [
        Route("/version-check", service.version_check, methods=["GET"]),
        Route("/tasks", service.list_tasks, methods=["GET"]),
        Route("/tasks/submit", service.submit, methods=["POST"]),
        Route("/tasks/{task_id}", service.get_task, methods=["GET"]),
        Route("/tasks/{task_id}/status", service.get_status, methods=["GET"]),
        Route("/tasks/{task_id}/kill", service.kill, methods=["POST"]),
        Route("/tasks/{task_id}/input_uploaded", service.input_uploaded, methods=["POST"]),
        Route("/tasks/{task_id}/register", service.live_register, methods=["POST"]),
        Route("/tasks/{task_id}/offer", service.live_offer, methods=["POST"]),
        Route("/tasks/{task_id}/message", service.live_message, methods=["GET"]),
        Route("/storage/signed-urls", service.signed_urls, methods=["GET"]),
        Route("/storage/zip-contents", service.zip_contents, methods=["GET"]),
        Route("/storage/zip-file-range", service.zip_file_range, methods=["GET"]),
        Route(OBJECTS_PREFIX + "{path:path}", service.object, methods=["GET", "HEAD", "PUT"]),
        Route("/users/info", service.user_info, methods=["GET"]),
        Route("/users/quotas", service.user_quotas, methods=["GET"]),
        Route("/users/costs", service.user_costs, methods=["GET"]),
        Route("/users/fees", service.user_fees, methods=["GET"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: _http_error,
        Exception: _internal_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    return KeyCheck(app, api_key)


# -- lifecycle -----------------------------------------------------------------------------------


def ensure_secret_file(path: Path, valid: Callable[[str], bool] = bool) -> str:
    """The secret in ``path``; a new one when it is missing or not ``valid`` (empty, short,
    left half-written by a crash), logged. Files are created 0600 and fully written before
    they appear (a temp file, fsynced, then linked or renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    while True:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            value = None
        except UnicodeDecodeError:
            value = ""
        if value is not None and valid(value):
            if path.stat().st_mode & 0o077:
                log.warning("%s was readable by others; restricting it to 0600", path)
                path.chmod(0o600)
            return value
        new = secrets.token_urlsafe(32)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(new + "\n")
                out.flush()
                os.fsync(out.fileno())
            if value is None:
                try:
                    os.link(tmp, path)  # only if still absent: a racing creator wins
                except FileExistsError:
                    continue
            else:
                log.warning("%s held no usable secret; replaced it with a new one", path)
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return new


def valid_url_secret(value: str) -> bool:
    return len(value) >= 32


def valid_api_key(value: str) -> bool:
    """A key as the service makes them: 32 characters at least (43 are written), so that a
    file cut short by a crash is not trusted."""
    return len(value) >= 32 and KEY_CHARSET.fullmatch(value) is not None


class DataDirLock:
    """An exclusive ``flock`` on the data dir: one service per data dir. The holder writes its
    pid into the lock file, which is how others find it (``config.local_service_pid``)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / SERVICE_LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # A probe (local_service_pid) holds a shared lock for an instant: try a few times.
        for attempt in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 19 or local_service_pid(self.path.parent) is not None:
                    os.close(fd)
                    running = ""
                    url = local_service_url(self.path.parent)
                    if url is not None:
                        running = f" at {url} (pid {local_service_pid(self.path.parent)})"
                    raise UsageError(
                        f"a taskfs service is already running for {self.path.parent}{running}"
                    ) from None
                time.sleep(0.025)
            except OSError:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def hypercorn_config(settings: ServiceSettings, debug: bool = False) -> HypercornConfig:
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = logging.getLogger("hypercorn.access") if debug else None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 3.0
    config.keep_alive_timeout = 30.0
    config.include_server_header = False
    return config


async def serve(
    settings: ServiceSettings,
    *,
    shutdown: trio.Event | None = None,
    debug: bool = False,
    runner_hook: StatusHook | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the service until cancelled or ``shutdown`` is set; reports its URL when ready.

    ``runner_hook`` is awaited after each status change of the runner (see ``Runner``).
    """
    make_dirs(settings.data_dir, 0o700)
    lock = DataDirLock(settings.data_dir)
    lock.acquire()
    if settings.adopt_orphans and not become_subreaper():
        log.warning("cannot become a child subreaper: a killed supervisor's processes may live on")
    store: Store | None = None
    live: LiveHub | None = None
    try:
        api_key = ensure_secret_file(settings.key_file, valid_api_key)
        secret = ensure_secret_file(settings.secret_file, valid_url_secret).encode()
        store = Store(settings.db_path)
        storage = Storage(settings.storage_dir, secret)
        runner = Runner(settings, store, storage, runner_hook)
        live = start_live_hub(settings, runner)
        app = create_app(settings, store, storage, runner, api_key, live)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sweep_storage, storage)
            await nursery.start(runner.run)
            try:
                async with trio.open_nursery() as http:
                    binds: list[str] = await http.start(
                        partial(
                            hypercorn_serve,
                            app,  # type: ignore[arg-type]
                            hypercorn_config(settings, debug),
                            shutdown_trigger=shutdown.wait if shutdown is not None else None,
                        )
                    )
                    url = binds[0]
                    _write_server_file(settings.server_file, url, settings)
                    log.info(
                        "taskfs service %s on %s, data in %s", __version__, url, settings.data_dir
                    )
                    task_status.started(url)
                # Hypercorn returned after its graceful shutdown: stop the runner too.
                nursery.cancel_scope.cancel()
            finally:
                with suppress(OSError):
                    settings.server_file.unlink()
    finally:
        if live is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await live.aclose()
        if store is not None:
            store.close()
        lock.release()


def start_live_hub(settings: ServiceSettings, runner: Runner) -> LiveHub | None:
    """The live channel's answerer, or None (answers 204) where ``aiortc`` is missing."""
    try:
        from taskfs.live.answerer import LiveHub  # noqa: PLC0415 - aiortc is optional
        from taskfs.live.rtc import hosts_for_bind  # noqa: PLC0415
    except ImportError:
        log.warning("aiortc is not installed: the live channel answers 204 (pip install aiortc)")
        return None
    return LiveHub(runner.computing.get, hosts_for_bind(settings.host))


async def _sweep_storage(storage: Storage) -> None:
    removed = await trio.to_thread.run_sync(storage.sweep_temporaries)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)


def _write_server_file(path: Path, url: str, settings: ServiceSettings) -> None:
    tmp = path.with_suffix(".tmp")
    info = {
        "url": url,
        "pid": os.getpid(),
        "version": __version__,
        "kill_grace_seconds": settings.kill_grace_seconds,  # how long a stop may take
    }
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, path)
