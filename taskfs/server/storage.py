"""Object storage of the embedded service: paths, signed URLs, output packing, ZIP metadata.

Owns: the mapping of storage paths (``{prefix}/{task_id}/output.zip``) to files under one root
directory, HMAC-signed URLs with an expiry, packing a task's working directory into its output
archive, and the ``zip-contents``/``zip-file-range`` answers computed from a stored archive.

Must stay true:
* no storage path ever resolves outside the root: ``..``, absolute paths, backslashes, NUL,
  empty segments and symlinks out of the root are refused (``ValueError``);
* a signed URL is valid only for its operation, its path and until its expiry; signatures are
  compared as bytes in constant time (any text a client sends is a "bad signature", never an
  error);
* an archive appears complete or not at all: it is written to a temporary file in the same
  directory, fsynced and renamed over the final name;
* everything here is synchronous and blocking; the app calls it through ``trio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from taskfs.packing import REPORT_NAME, Issue, pack_tree

_SEGMENT = re.compile(r"[A-Za-z0-9._~@+=,-]+")
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
LOCAL_HEADER_MAGIC = b"PK\x03\x04"
OUTPUT_PREFIX = "artifacts/"


def check_storage_path(path: str) -> str:
    """Validate a storage path and return it normalised; ``ValueError`` if it could escape.

    One leading ``/`` is no slash (the official client asks for ``/<task_id>/input.zip``
    when its storage prefix is empty, and the cloud service accepts that).
    """
    path = path.removeprefix("/")
    if not path or len(path) > 1024:
        raise ValueError(f"invalid storage path: {path!r}")
    for segment in path.split("/"):
        if segment in (".", "..") or len(segment) > 255 or not _SEGMENT.fullmatch(segment):
            raise ValueError(f"invalid storage path: {path!r}")
    return path


@dataclass(frozen=True)
class OutputStats:
    """What packing found: bytes and files archived, archive size, what it could not keep."""

    size_bytes: int
    total_files: int
    zipped_size_bytes: int
    issues: tuple[Issue, ...] = ()


class Storage:
    """Files under ``root`` addressed by storage path, and URL signing with ``secret``."""

    def __init__(self, root: Path, secret: bytes) -> None:
        self.root = root
        self._secret = secret
        root.mkdir(parents=True, exist_ok=True)
        self._real_root = root.resolve()

    # -- paths ---------------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """The file behind a storage path; ``ValueError`` if the path is invalid or escapes."""
        clean = check_storage_path(path)
        candidate = self._real_root / clean
        real = candidate.resolve()
        if real != self._real_root and self._real_root not in real.parents:
            raise ValueError(f"storage path escapes the storage root: {path!r}")
        return candidate

    # -- signing -------------------------------------------------------------------------------

    def signature(self, operation: str, path: str, expires: int) -> str:
        message = f"{operation}\n{path}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, operation: str, path: str, ttl_seconds: int) -> tuple[int, str]:
        """``(expires, signature)`` for ``operation`` (``download``/``upload``) on ``path``."""
        expires = int(time.time()) + ttl_seconds
        return expires, self.signature(operation, path, expires)

    def verify(self, operation: str, path: str, expires: str, signature: str) -> str | None:
        """``None`` when the signature is valid and unexpired, else the reason it is not."""
        if not (expires.isascii() and expires.isdigit()) or len(expires) > 20:
            return "malformed expiry"
        if int(expires) < time.time():
            return "signed URL expired"
        expected = self.signature(operation, path, int(expires)).encode()
        if not hmac.compare_digest(expected, signature.encode("utf-8", "surrogateescape")):
            return "bad signature"
        return None

    # -- objects -------------------------------------------------------------------------------

    def sweep_temporaries(self) -> int:
        """Remove what writes interrupted by a crash left (``.upload-*``, ``.output-*``); only
        while this service holds the data dir (no other writer). How many went."""
        removed = 0
        for dirpath, _, filenames in os.walk(self._real_root):
            for name in filenames:
                if name.startswith((".upload-", ".output-")):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed

    @staticmethod
    def etag(st: os.stat_result) -> str:
        """A strong ETag: changes whenever the file is replaced (new inode) or rewritten, even
        in place with its old size and mtime put back (the change time cannot be set back)."""
        return f'"{st.st_ino:x}-{st.st_ctime_ns:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'

    # -- outputs -------------------------------------------------------------------------------

    def pack_outputs(
        self,
        work_dir: Path | None,
        path: str,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> OutputStats:
        """Pack ``work_dir`` into the archive at ``path``: ``artifacts/`` plus every file, by
        the rules of ``taskfs.packing`` (what cannot be kept as it was is listed in the member
        ``artifacts/taskfs-packing.txt``). Written to a temp file, fsynced and renamed;
        ``PackingCancelled`` (and no archive) when ``cancelled()`` says stop.
        """
        target = self.resolve(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".output-", suffix=".zip")
        try:
            with os.fdopen(fd, "w+b") as raw:
                result = pack_tree(
                    work_dir,
                    raw,
                    OUTPUT_PREFIX,
                    report_name=REPORT_NAME,
                    follow_root=False,  # a task may swap its working directory for a link
                    one_filesystem=True,  # nor pack what a task (of a root service) mounted
                    cancelled=cancelled,
                )
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return OutputStats(
            result.size_bytes, result.files, target.stat().st_size, tuple(result.issues)
        )

    def zip_contents(self, path: str, relative: str, recursive: bool) -> dict[str, Any]:
        """``ZipArchiveInfo`` for members under ``relative``; names relative to it."""
        file = self.resolve(path)
        prefix = _dir_prefix(relative)
        contents = []
        with zipfile.ZipFile(file) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(prefix) or info.is_dir():
                    continue
                name = info.filename[len(prefix) :]
                if not name or (not recursive and "/" in name):
                    continue
                contents.append(
                    {
                        "name": name,
                        "size": info.file_size,
                        "compressed_size": info.compress_size,
                        "range_start": info.header_offset,
                        "creation_time": _zip_time(info),
                        "compress_type": info.compress_type,
                    }
                )
        return {"size": file.stat().st_size, "contents": contents}

    def zip_file_range(self, path: str, relative: str, filename: str) -> dict[str, Any]:
        """Byte range (end inclusive) of one member's compressed data; ``KeyError`` if absent."""
        file = self.resolve(path)
        name = _dir_prefix(relative) + filename.lstrip("/")
        with zipfile.ZipFile(file) as zf:
            info = zf.getinfo(name)
        with open(file, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(LOCAL_HEADER.size)
        fields = LOCAL_HEADER.unpack(header)
        if fields[0] != LOCAL_HEADER_MAGIC:
            raise zipfile.BadZipFile(f"bad local header for {name!r}")
        name_len, extra_len = fields[9], fields[10]
        start = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
        return {
            "range_start": start,
            "range_end": start + info.compress_size - 1,
            "compress_type": info.compress_type,
        }


def _dir_prefix(relative: str) -> str:
    relative = relative.strip("/")
    return relative + "/" if relative else ""


def _zip_time(info: zipfile.ZipInfo) -> str | None:
    """A member's time with its UTC offset: the extended timestamp (0x5455) where present,
    else its DOS date read as UTC (as taskfs's reader does); ``None`` for a DOS date that is
    not one (zeros, a 13th month)."""
    extra, pos = info.extra, 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x5455 and length >= 5 and pos + 9 <= len(extra) and extra[pos + 4] & 1:
            seconds = struct.unpack_from("<i", extra, pos + 5)[0]
            return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")
        pos += 4 + length
    try:
        moment = datetime(*info.date_time, tzinfo=UTC)
    except (ValueError, OverflowError):
        return None
    return moment.isoformat(timespec="microseconds")
