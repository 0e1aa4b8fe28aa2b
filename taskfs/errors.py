"""The exception tree of taskfs; every class knows the errno the filesystem answers with.

Foreign exceptions (httpx, zlib, sqlite3, OSError from the network) are translated at the edge
of the layer that meets them and chained with ``raise ... from exc``; nothing above that layer
catches a foreign exception type. The filesystem maps exceptions to errno through
``TaskfsError.errno`` only (one table, used by ``fs.fuse_ops``).

    TaskfsError                     EIO      base class; anything unexpected is also EIO
    ├── NotFoundError               ENOENT   no such task, output name or storage object
    ├── AuthError                   EACCES   API key missing or rejected
    ├── ServiceError                EIO      unreachable, timed out, 5xx after retries
    ├── ProtocolError               EIO      the peer broke the protocol (bad JSON, 200 for a range)
    ├── LiveError                   EIO      a running task's live channel failed or is missing
    │   ├── NoLiveChannelError      EIO      the service offers no live channel for the task (204)
    │   └── LiveUnavailableError    ENODATA  a running task's file the live channel cannot carry
    ├── TaskEndedError              ESRCH    kill on a task that has already ended
    ├── InvalidCommandError         EINVAL   unknown word written to ``control``
    ├── ReadOnlyError               EROFS    write to anything but ``control``
    ├── StaleError                  ESTALE   the archive changed under an open file (ETag)
    ├── NotDirError                 ENOTDIR  a directory operation on a file
    ├── IsDirError                  EISDIR   a file operation on a directory
    ├── BusyError                   EAGAIN   too many readers already blocked on ``wait``
    ├── ReaderGoneError             EINTR    the process blocked on ``wait`` went away
    ├── UnmountingError             ENOTCONN the mount is going away (SIGTERM, ``taskfs unmount``)
    └── ArchiveError                EIO      corrupt or truncated archive
        ├── ChecksumError           EIO      CRC-32 mismatch: never return the bytes
        └── UnsupportedError        ENOTSUP  a compression method taskfs cannot read
    UsageError                      (CLI)    bad command-line input (or bytes that are not UTF-8
                                             where the API takes text); one line, exit status 2
    LocalError                      (errno)  a local file operation failed (the OSError's errno)
"""

from __future__ import annotations

import errno as _errno


class TaskfsError(Exception):
    """Base class. ``errno`` is what the filesystem answers; ``str()`` is safe to show users."""

    errno: int = _errno.EIO


class NotFoundError(TaskfsError):
    errno = _errno.ENOENT


class AuthError(TaskfsError):
    errno = _errno.EACCES


class ServiceError(TaskfsError):
    """The service is unreachable, timed out, or kept answering 5xx until the deadline."""

    errno = _errno.EIO


class ProtocolError(TaskfsError):
    """The peer answered something the protocol does not allow."""

    errno = _errno.EIO


class LiveError(TaskfsError):
    """The live channel of a running task could not be opened, broke, or answered an error."""

    errno = _errno.EIO


class NoLiveChannelError(LiveError):
    """The service answered the offer with no live channel (the task is not computing, or the
    service does not stream running tasks)."""


class LiveUnavailableError(LiveError):
    """A running task's file the live channel cannot carry (not text, gone): its bytes are in
    the outputs archive once the task ends."""

    errno = _errno.ENODATA


class TaskEndedError(TaskfsError):
    errno = _errno.ESRCH


class InvalidCommandError(TaskfsError):
    errno = _errno.EINVAL


class ReadOnlyError(TaskfsError):
    errno = _errno.EROFS


class StaleError(TaskfsError):
    errno = _errno.ESTALE


class NotDirError(TaskfsError):
    errno = _errno.ENOTDIR


class IsDirError(TaskfsError):
    errno = _errno.EISDIR


class BusyError(TaskfsError):
    errno = _errno.EAGAIN


class ReaderGoneError(TaskfsError):
    errno = _errno.EINTR


class UnmountingError(TaskfsError):
    """The mount is being unmounted: operations in flight and arriving are answered at once,
    with the error every later access of the gone mount gets."""

    errno = _errno.ENOTCONN


class ArchiveError(TaskfsError):
    errno = _errno.EIO


class ChecksumError(ArchiveError):
    errno = _errno.EIO


class UnsupportedError(ArchiveError):
    errno = _errno.ENOTSUP


class UsageError(TaskfsError):
    """Bad command-line input: the CLI prints the message and exits with status 2."""

    errno = _errno.EINVAL


class LocalError(TaskfsError):
    """A local file operation failed (an unwritable directory, a full disk, a name too long):
    the ``OSError`` as a ``TaskfsError`` with its errno and one line of text."""

    def __init__(self, exc: OSError) -> None:
        where = f": {exc.filename}" if exc.filename is not None else ""
        super().__init__(f"{exc.strerror or exc}{where}")
        self.errno = exc.errno or _errno.EIO


def unwrap(exc: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups (trio nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def leaves(exc: BaseException) -> list[BaseException]:
    """Every exception inside ``exc``, exception groups flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def as_taskfs_error(exc: BaseException) -> TaskfsError | None:
    """The error to show for ``exc``: a ``TaskfsError`` (the first of a group, noting how many
    more there were), a local ``OSError`` as ``LocalError``; ``None`` when ``exc`` (or some
    leaf of it) is neither, a bug or an interruption, which must not be disguised."""
    found = leaves(exc)
    converted: list[TaskfsError] = []
    for leaf in found:
        if isinstance(leaf, TaskfsError):
            converted.append(leaf)
        elif isinstance(leaf, OSError) and not isinstance(leaf, BrokenPipeError):
            converted.append(LocalError(leaf))
        elif isinstance(leaf, UnicodeEncodeError) and leaf.reason == "surrogates not allowed":
            converted.append(_not_text(leaf))
        else:
            return None
    if not converted:
        return None
    first = converted[0]
    if len(converted) > 1 and not isinstance(exc, TaskfsError):
        first.add_note(f"({len(converted) - 1} more errors)")
    return first


def _not_text(exc: UnicodeEncodeError) -> UsageError:
    """Bytes that are not UTF-8 (the OS hands them over as surrogates) in a value that goes
    to the API, which takes text: the user's input, shown around the bad byte."""
    text = str(exc.object)
    # The value it is in: from the quote before to the quote after (JSON), else around it.
    start = text.rfind('"', 0, exc.start) + 1
    end = text.find('"', exc.end)
    value = text[start : end if end >= 0 else len(text)][:200]
    shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    error = UsageError(f"not UTF-8 text, which the API needs: {shown}")
    error.__cause__ = exc
    return error


class single_errors:  # noqa: N801 - used like contextlib's lower-case context managers
    """Re-raise what escapes as one ``TaskfsError``: an exception group of them (trio
    nurseries) as its first, a local ``OSError`` as ``LocalError``.

    Library entry points use it, so callers catch ``TaskfsError`` rather than
    ``ExceptionGroup`` or ``OSError``. Cancellations and bugs pass unchanged.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, TaskfsError):
            return
        error = as_taskfs_error(exc)
        if error is not None:
            raise error from exc
