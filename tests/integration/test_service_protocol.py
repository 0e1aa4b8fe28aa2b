"""The service keeps TASK_API.md sections 1 and 3 to the letter: auth, errors, paging, ranges."""

from __future__ import annotations

import io
import os
import struct
import time
import zipfile
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode as S
from taskfs.api.submit import submit_task
from taskfs.server.storage import Storage
from tests.integration.conftest import Service
from tests.support import wait_status


def assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"]
    return str(body["detail"])


# -- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/tasks", "/tasks/abc", "/tasks/abc/status", "/storage/signed-urls", "/users/info"]
)
async def test_requests_without_valid_key_are_401(service: Service, path: str) -> None:
    async with httpx.AsyncClient(base_url=service.url) as plain:
        assert "X-API-Key" in assert_json_error(await plain.get(path), 401)
        wrong = await plain.get(path, headers={"X-API-Key": service.key + "x"})
        assert_json_error(wrong, 401)
        assert_json_error(await plain.post("/tasks/abc/kill"), 401)


async def test_version_check_is_public(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.url) as plain:
        response = await plain.get("/version-check", params={"client_version": "0.18.12"})
    assert response.status_code == 200
    body = response.json()
    assert body["is_valid"] is True and body["client_version"] == "0.18.12"
    assert isinstance(body["server_version"], str)


async def test_key_file_is_private(service: Service) -> None:
    for path in (service.settings.key_file, service.settings.secret_file):
        assert path.stat().st_mode & 0o777 == 0o600


# -- errors and validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "task_id", ["nope", "..", "a%20b", "x" * 65, "%00", "a;drop", "%2E%2E%2Fetc"]
)
async def test_unknown_or_odd_ids_are_404(http: httpx.AsyncClient, task_id: str) -> None:
    for path in (f"/tasks/{task_id}", f"/tasks/{task_id}/status"):
        assert_json_error(await http.get(path), 404)
    assert_json_error(await http.post(f"/tasks/{task_id}/kill"), 404)


@pytest.mark.parametrize(
    "query",
    [
        "per_page=0",
        "per_page=501",
        "per_page=ten",
        "page=0",
        "page=-1",
        "status=finished",
        "status=SUCCESS",
    ],
)
async def test_bad_list_parameters_are_422(http: httpx.AsyncClient, query: str) -> None:
    assert_json_error(await http.get(f"/tasks?{query}"), 422)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"resource_pool": null, "container_image": null}',
        b'{"simulator": 3, "resource_pool": null, "container_image": null}',
        b'{"simulator": "x", "resource_pool": null, "container_image": null,'
        b' "extra_params": {"commands": "echo hi"}}',
        b'{"simulator": "x", "resource_pool": null, "container_image": null,'
        b' "extra_params": {"commands": [{"prompts": []}]}}',
        b'{"simulator": "x", "resource_pool": null, "container_image": null,'
        b' "time_to_live_seconds": -5}',
        b'{"simulator": "x", "resource_pool": null, "container_image": null,'
        b' "storage_path_prefix": "../escape"}',
        # A prefix whose archives could not be stored: too long, a name over 255 bytes.
        b'{"simulator": "x", "resource_pool": null, "container_image": null,'
        b' "storage_path_prefix": "' + b"p" * 1000 + b'"}',
        b'{"simulator": "x", "resource_pool": null, "container_image": null,'
        b' "storage_path_prefix": "' + b"p" * 300 + b'"}',
        # Commands the system could not run.
        b'{"simulator": "x", "resource_pool": null, "container_image": null,'
        b' "extra_params": {"commands": [{"cmd": "echo a\\u0000b", "prompts": []}]}}',
        b'{"simulator": "x", "resource_pool": null, "container_image": null,'
        b' "extra_params": {"commands": [{"cmd": "' + b"x" * 200_000 + b'", "prompts": []}]}}',
        # JSON nested deeper than a parser should recurse.
        b'{"simulator": "x", "resource_pool": null, "container_image": null,'
        b' "extra_params": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}",
    ],
)
async def test_bad_submit_bodies_are_422(http: httpx.AsyncClient, body: bytes) -> None:
    response = await http.post(
        "/tasks/submit", content=body, headers={"Content-Type": "application/json"}
    )
    assert_json_error(response, 422)
    # Nothing was created.
    assert (await http.get("/tasks")).json()["total_size"] == 0


@pytest.mark.parametrize(
    "path",
    [
        "../secret",
        "//etc/passwd",
        "/../secret",
        "a/../../b",
        "a//b",
        "a/./b",
        "a\\b",
        "..",
        "x/\x00",
        "",
    ],
)
async def test_storage_paths_outside_the_root_are_refused(
    http: httpx.AsyncClient, path: str
) -> None:
    for query in (
        {"operation": "download", "paths": path},
        {"operation": "upload", "paths": path},
    ):
        assert_json_error(await http.get("/storage/signed-urls", params=query), 422)
    assert_json_error(
        await http.get(
            "/storage/zip-contents", params={"path": path, "zip_relative_path": "artifacts/"}
        ),
        422,
    )


async def test_a_leading_slash_is_no_slash(http: httpx.AsyncClient) -> None:
    """TASK_API.md: the official client asks for ``/<task_id>/input.zip``; ``/etc/passwd``
    is the storage object ``etc/passwd`` (inside the root), never the machine's file."""
    for path in ("/etc/passwd", "/abc/input.zip"):
        response = await http.get(
            "/storage/signed-urls", params={"operation": "download", "paths": path}
        )
        assert response.status_code == 200
        [url] = response.json()
        assert f"/storage/objects/{path.lstrip('/')}?" in url
        async with httpx.AsyncClient() as plain:
            assert (await plain.get(url)).status_code == 404  # no such object in storage
    zip_contents = await http.get(
        "/storage/zip-contents", params={"path": "/abc/output.zip", "zip_relative_path": "a/"}
    )
    assert zip_contents.status_code == 404


# The server answers before the client has sent everything: httpx then leaves its body
# iterator unfinished, which Python reports as an unraisable exception in the client.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_huge_request_body_is_413(http: httpx.AsyncClient) -> None:
    body = b'{"simulator": "' + b"x" * (2 << 20) + b'", "resource_pool": null}'
    response = await http.post(
        "/tasks/submit", content=body, headers={"Content-Type": "application/json"}
    )
    assert_json_error(response, 413)
    assert (await http.get("/tasks")).json()["total_size"] == 0


async def test_uploads_into_a_tasks_storage_are_refused(http: httpx.AsyncClient) -> None:
    """Only a task's input.zip may be uploaded into its storage (and never its output, nor
    anything that would turn its directory into a file)."""
    created = await http.post(
        "/tasks/submit", json={"simulator": "x", "resource_pool": None, "container_image": None}
    )
    task_id = created.json()["id"]
    for path in (f"{task_id}/output.zip", f"{task_id}/output.zip/x", f"{task_id}/x", task_id):
        query = {"operation": "upload", "paths": path}
        assert_json_error(await http.get("/storage/signed-urls", params=query), 403)
    query = {"operation": "upload", "paths": f"/{task_id}/input.zip"}
    assert (await http.get("/storage/signed-urls", params=query)).status_code == 200


async def test_zip_endpoints_on_damaged_uploads(http: httpx.AsyncClient) -> None:
    """A member with a zero DOS date is listed (no creation time); a local header pointing past
    the end is a 422, never a 500."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("artifacts/ok.txt", date_time=(1980, 1, 1, 0, 0, 0)), b"ok")
    data = bytearray(buf.getvalue())
    central = data.index(b"PK\x01\x02")
    data[central + 12 : central + 16] = b"\0\0\0\0"  # time and date: zero
    bad = bytearray(data)
    struct.pack_into("<I", bad, central + 42, 10_000_000)  # local header offset past the end
    for name, content in (("zero.zip", data), ("past.zip", bad)):
        query = {"operation": "upload", "paths": f"user/{name}"}
        [url] = (await http.get("/storage/signed-urls", params=query)).json()
        async with httpx.AsyncClient() as plain:
            assert (await plain.put(url, content=bytes(content))).status_code == 200
    listed = await http.get(
        "/storage/zip-contents", params={"path": "user/zero.zip", "zip_relative_path": "artifacts"}
    )
    assert listed.status_code == 200
    assert listed.json()["contents"][0]["creation_time"] is None
    ranged = await http.get(
        "/storage/zip-file-range",
        params={"path": "user/past.zip", "zip_relative_path": "artifacts", "filename": "ok.txt"},
    )
    assert_json_error(ranged, 422)


async def test_uploads_where_no_object_can_be_are_409(http: httpx.AsyncClient) -> None:
    """A signed upload to a path that is a directory, or under an existing object, is a clear
    client error, never a 500."""

    async def put(path: str) -> httpx.Response:
        answer = await http.get(
            "/storage/signed-urls", params={"operation": "upload", "paths": path}
        )
        assert answer.status_code == 200, answer.text
        async with httpx.AsyncClient() as plain:
            return await plain.put(answer.json()[0], content=b"data")

    assert (await put("/t1/input.zip")).status_code == 200
    for path in ("/t1", "t1/input.zip/inner"):
        response = await put(path)
        assert_json_error(response, 409)
        assert "cannot store an object" in response.json()["detail"]


async def test_object_route_refuses_traversal(service: Service) -> None:
    storage = Storage(
        service.settings.storage_dir, service.settings.secret_file.read_bytes().strip()
    )
    expires, sig = storage.sign("download", "../api_key", 60)
    async with httpx.AsyncClient(base_url=service.url) as plain:
        for raw in ("../api_key", "%2E%2E/api_key", "..%2Fapi_key"):
            response = await plain.get(
                f"/storage/objects/{raw}", params={"op": "download", "expires": expires, "sig": sig}
            )
            assert response.status_code in (401, 403, 404)
            assert service.key not in response.text


async def test_kill_without_body_and_input_uploaded_twice(http: httpx.AsyncClient) -> None:
    created = await http.post(
        "/tasks/submit",
        json={"simulator": "x", "resource_pool": None, "container_image": None},
    )
    assert created.status_code == 202
    task_id = created.json()["id"]
    assert created.json()["status"] == "pending-input"
    assert (await http.post(f"/tasks/{task_id}/input_uploaded")).status_code == 200
    assert_json_error(await http.post(f"/tasks/{task_id}/input_uploaded"), 409)
    kill = await http.post(f"/tasks/{task_id}/kill")  # no body, no content type
    assert kill.status_code == 200 and kill.json()["id"] == task_id


async def test_unknown_route_and_method(http: httpx.AsyncClient) -> None:
    assert_json_error(await http.get("/no/such/thing"), 404)
    assert_json_error(await http.delete("/tasks"), 405)


async def test_live_channel_of_a_task_that_is_not_computing(
    http: httpx.AsyncClient, api: ApiClient
) -> None:
    """Signalling is accepted, and ``message`` has no answer: 204 (tests/integration/
    test_live.py covers tasks that are computing)."""
    task_id = await submit_task(api, ["true"])
    await wait_status(api, task_id)
    assert (await http.get(f"/tasks/{task_id}/message")).status_code == 204
    register = await http.post(f"/tasks/{task_id}/register", json={"sender_id": "a"})
    assert register.status_code == 200
    assert register.json() == {"sender_id": "a"}
    offer = {"sender_id": "a", "receiver_id": task_id, "type": "offer", "sdp": "v=0\r\n"}
    assert (await http.post(f"/tasks/{task_id}/offer", json=offer)).status_code == 200
    answer = await http.get(f"/tasks/{task_id}/message", params={"client": "a"})
    assert answer.status_code == 204


# -- paging and filters --------------------------------------------------------------------------


async def test_paging_newest_first_and_filters(api: ApiClient, http: httpx.AsyncClient) -> None:
    ids = []
    for i in range(7):
        ids.append(await submit_task(api, ["true"], project="even" if i % 2 == 0 else "odd"))
    for task_id in ids:
        await wait_status(api, task_id)
    newest_first = list(reversed(ids))
    seen = []
    for page in (1, 2, 3):
        body = (await http.get("/tasks", params={"page": page, "per_page": 3})).json()
        assert body["total_size"] == 7
        seen += [t["task_id"] for t in body["tasks"]]
    assert seen == newest_first
    past = (await http.get("/tasks", params={"page": 4, "per_page": 3})).json()
    assert past == {"total_size": 7, "tasks": []}
    even = (await http.get("/tasks", params={"project": "even", "per_page": 500})).json()
    assert [t["task_id"] for t in even["tasks"]] == newest_first[::2]
    none = (await http.get("/tasks", params={"status": "failed"})).json()
    assert none == {"total_size": 0, "tasks": []}
    listed = [t.task_id async for t in api.iter_tasks(per_page=2)]
    assert listed == newest_first
    for item in (await http.get("/tasks")).json()["tasks"]:
        assert isinstance(item["metrics"], dict)


# -- signed URLs and ranges ----------------------------------------------------------------------


async def _archive_url(api: ApiClient) -> tuple[str, str]:
    task_id = await submit_task(api, ["seq 1 20000 > numbers.txt"])
    await wait_status(api, task_id)
    task = await api.get_task(task_id)
    assert task.storage_output_path is not None
    return await api.download_url(task.storage_output_path), task.storage_output_path


async def test_ranges_etag_and_conditions(api: ApiClient) -> None:
    url, _ = await _archive_url(api)
    async with httpx.AsyncClient() as plain:
        full = await plain.get(url)
        assert full.status_code == 200
        body = full.content
        etag = full.headers["etag"]
        assert etag.startswith('"') and not etag.startswith("W/")
        assert full.headers["accept-ranges"] == "bytes"
        size = len(body)

        head = await plain.head(url)
        assert head.status_code == 200 and int(head.headers["content-length"]) == size

        part = await plain.get(url, headers={"Range": "bytes=10-99"})
        assert part.status_code == 206 and part.content == body[10:100]
        assert part.headers["content-range"] == f"bytes 10-99/{size}"

        tail = await plain.get(url, headers={"Range": "bytes=-64"})
        assert tail.status_code == 206 and tail.content == body[-64:]
        assert tail.headers["content-range"] == f"bytes {size - 64}-{size - 1}/{size}"

        big_tail = await plain.get(url, headers={"Range": f"bytes=-{size * 10}"})
        assert big_tail.status_code == 206 and big_tail.content == body

        open_end = await plain.get(url, headers={"Range": f"bytes={size - 5}-"})
        assert open_end.status_code == 206 and open_end.content == body[-5:]

        beyond = await plain.get(url, headers={"Range": f"bytes={size}-{size + 10}"})
        assert beyond.status_code == 416

        matching = await plain.get(url, headers={"Range": "bytes=0-3", "If-Match": etag})
        assert matching.status_code == 206 and matching.content == b"PK\x03\x04"
        stale = await plain.get(url, headers={"Range": "bytes=0-3", "If-Match": '"other"'})
        assert_json_error(stale, 412)

        same = await plain.get(url, headers={"Range": "bytes=0-3", "If-Range": etag})
        assert same.status_code == 206
        changed = await plain.get(url, headers={"Range": "bytes=0-3", "If-Range": '"old"'})
        assert changed.status_code == 200 and changed.content == body

        identity = await plain.get(
            url, headers={"Range": "bytes=0-999", "Accept-Encoding": "gzip, deflate"}
        )
        assert "content-encoding" not in identity.headers and len(identity.content) == 1000


async def test_an_archive_rewritten_in_place_gets_a_new_etag(
    api: ApiClient, service: Service
) -> None:
    """Same inode, same size, its mtime put back (a task with the service's rights, or a
    careless script): the ETag still changes, so no reader mixes old and new bytes."""
    url, path = await _archive_url(api)
    file = service.settings.storage_dir / path
    async with httpx.AsyncClient() as plain:
        before = (await plain.head(url)).headers["etag"]
        st = file.stat()
        data = bytearray(file.read_bytes())
        data[40] ^= 0x55
        with open(file, "r+b") as f:  # in place: the inode stays
            f.write(data)
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert file.stat().st_ino == st.st_ino and file.stat().st_mtime_ns == st.st_mtime_ns
        after = (await plain.head(url)).headers["etag"]
    assert after != before


async def test_signed_url_expiry_tampering_and_operation(api: ApiClient, service: Service) -> None:
    url, path = await _archive_url(api)
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    secret = service.settings.secret_file.read_text().strip().encode()
    storage = Storage(service.settings.storage_dir, secret)
    past = int(time.time()) - 5
    async with httpx.AsyncClient() as plain:
        assert (await plain.get(url)).status_code == 200
        expired = {**query, "expires": str(past), "sig": storage.signature("download", path, past)}
        assert "expired" in assert_json_error(await plain.get(base, params=expired), 403)
        tampered = {**query, "sig": query["sig"][:-1] + ("0" if query["sig"][-1] != "0" else "1")}
        assert_json_error(await plain.get(base, params=tampered), 403)
        later = {**query, "expires": str(int(query["expires"]) + 1000)}
        assert_json_error(await plain.get(base, params=later), 403)
        other_path = base.replace("output.zip", "input.zip")
        assert_json_error(await plain.get(other_path, params=query), 403)
        assert_json_error(await plain.put(base, params=query, content=b"x"), 403)
        unsigned = await plain.get(base)
        assert_json_error(unsigned, 403)


async def test_upload_then_download_and_outputs_are_immutable(
    api: ApiClient, http: httpx.AsyncClient
) -> None:
    [put_url] = await api.signed_urls("upload", ["scratch/blob.bin"])
    payload = bytes(range(256)) * 4096
    async with httpx.AsyncClient() as plain:
        put = await plain.put(
            put_url, content=payload, headers={"Content-Type": "application/octet-stream"}
        )
        assert put.status_code == 200
        [get_url] = await api.signed_urls("download", ["scratch/blob.bin"])
        assert (await plain.get(get_url)).content == payload
    task_id = await submit_task(api, ["true"])
    await wait_status(api, task_id)
    response = await http.get(
        "/storage/signed-urls", params={"operation": "upload", "paths": f"{task_id}/output.zip"}
    )
    assert_json_error(response, 403)


async def test_urls_follow_the_base_url_of_the_request(service: Service) -> None:
    async with httpx.AsyncClient(
        base_url=service.url, headers={"X-API-Key": service.key, "Host": "proxy.example:9999"}
    ) as client:
        urls = (
            await client.get(
                "/storage/signed-urls", params={"operation": "download", "paths": "a/b.zip"}
            )
        ).json()
    assert urls[0].startswith("http://proxy.example:9999/storage/objects/a/b.zip?")


async def test_zip_listing_and_member_ranges_match_the_archive(api: ApiClient) -> None:
    task_id = await submit_task(
        api, ["mkdir -p d/e && seq 1 500 > d/e/n.txt && printf abc > top.txt"]
    )
    await wait_status(api, task_id)
    task = await api.get_task(task_id)
    assert task.storage_output_path is not None
    listing = await api.zip_contents(task.storage_output_path, "artifacts/", recursive=True)
    names = {m.name: m for m in listing.contents}
    assert set(names) == {"d/e/n.txt", "top.txt", "stdout.txt", "stderr.txt"}
    flat = await api.zip_contents(task.storage_output_path, "artifacts", recursive=False)
    assert {m.name for m in flat.contents} == {"top.txt", "stdout.txt", "stderr.txt"}
    url = await api.download_url(task.storage_output_path)
    async with httpx.AsyncClient() as plain:
        whole = (await plain.get(url)).content
        assert listing.size == len(whole)
        response = await api.http.get(
            "/storage/zip-file-range",
            params={
                "path": task.storage_output_path,
                "zip_relative_path": "artifacts/",
                "filename": "d/e/n.txt",
            },
        )
        rng = response.json()
        import zlib

        data = whole[rng["range_start"] : rng["range_end"] + 1]
        assert zlib.decompress(data, -15) == b"".join(f"{i}\n".encode() for i in range(1, 501))
        missing = await api.http.get(
            "/storage/zip-file-range",
            params={"path": task.storage_output_path, "filename": "nope"},
        )
        assert_json_error(missing, 404)
    assert (await api.get_status(task_id)).status == S.SUCCESS
