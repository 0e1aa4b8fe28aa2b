"""The live channel's messages (TASK_API.md, "Live channel"), for both sides; no I/O.

Owns: what a request may be, what an answer looks like, how text is cut into messages, and
how a listing is read back. The official client (0.18.12) and the cloud's answerer agree on:

* a request ``{"type": "ls"|"tail"|"top"|"last_modified_file", "follow": bool, "args": {}}``,
  sent once when the channel opens; ``tail`` takes ``{"filename", "lines", "wait"}``;
* answers ``{"status": "success"|"invalid"|"error", "message": ...}``; a non-success ends the
  stream; without ``follow`` the first answer ends it;
* ``tail`` answers with lists of lines (no line ends): first the last ``lines`` lines, then,
  when following, only lines appended since.

What this side adds, within that protocol (so the official client reads it unchanged):

* a followed ``tail`` sends an empty answer (``[]``) once the lines the file had when asked
  are all sent: after it, every answer is new text;
* a followed ``tail`` sends only complete lines: a last line without its newline is held back
  until the newline arrives, so a follower that joins lines with ``\\n`` rebuilds the file's
  bytes exactly (the one-shot ``tail`` does include it, as ``tail`` does);
* no message is larger than the peer accepts (``a=max-message-size``: 256 KiB for aiortc;
  peers that say nothing get ``MESSAGE_BUDGET``): a long answer goes out as several messages
  when following, and a one-shot one keeps its last lines that fit; a line too long for one
  message is cut into the longest pieces that fit, each sent as a line of its own;
* a ``tail`` answer says which of its lines are not ended by a newline: such pieces, each
  continued by the next line (in it or in the next answer), and a file's unterminated last
  line: ``"continued": [indices]`` beside ``message`` (``Cut`` lines; the official client
  reads only ``status`` and ``message``), so that a follower rebuilds a file byte for byte
  (``text_of``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

LABEL: Final = "file_transfer"
OPERATIONS: Final = ("ls", "tail", "top", "last_modified_file")
# The default max-message-size of SCTP peers that do not announce one (RFC 8841): 64 KiB.
MESSAGE_BUDGET: Final = 60_000
# Upper bound of ``lines``: "every line" is asked for with a large number.
MAX_LINES: Final = 1 << 31
MAX_REQUEST: Final = 16_384
# A listing read back from a peer: at most this many entries and this depth.
MAX_LISTING: Final = 200_000
MAX_DEPTH: Final = 256


# How the answering side says why it cannot serve a file: the start of an ``error`` answer's
# text (the cloud's runner says "File not found" and "File is not a text file" too). The
# answering side writes them, taskfs's followers read them.
BAD_NAME = "Invalid file name"
CANNOT_OPEN = "Cannot open"
OUTSIDE = "File is outside the task's directory"
NOT_A_FILE = "Not a file"
NOT_REGULAR = "Not a regular file"
NOT_FOUND = "File not found"
NOT_TEXT = "File is not a text file"
# Not a refusal: the file was truncated or its name now is another file; ask again.
STARTED_AGAIN = "File was truncated or replaced"


class LiveProtocolError(ValueError):
    """A request or answer that breaks the protocol; the text is for the peer or the user."""


class OfferError(ValueError):
    """An offer the answerer cannot answer (malformed); the text is for the caller."""


class LiveBusyError(RuntimeError):
    """Too many live connections open; the text is for the caller."""


@dataclass(frozen=True, slots=True)
class Request:
    type: str
    follow: bool
    args: dict[str, Any]

    def encode(self) -> str:
        return json.dumps({"type": self.type, "follow": self.follow, "args": self.args})


@dataclass(frozen=True, slots=True)
class TailArgs:
    filename: str
    lines: int
    wait: bool
    # Followed to the task's end: send its unterminated last line then too (taskfs's mount,
    # which goes on from the outputs archive, asks for ``"last_partial": false``).
    last_partial: bool = True


def parse_request(raw: str | bytes) -> Request:
    """A request as sent on a channel; ``LiveProtocolError`` says what is wrong with it."""
    if len(raw) > MAX_REQUEST:
        raise LiveProtocolError(f"request larger than {MAX_REQUEST} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LiveProtocolError(f"request is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LiveProtocolError("request must be a JSON object")
    kind = data.get("type")
    if kind not in OPERATIONS:
        raise LiveProtocolError(f"Unknown operation type: {kind}")
    follow = data.get("follow", False)
    args = data.get("args", {})
    if not isinstance(follow, bool):
        raise LiveProtocolError("follow must be true or false")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise LiveProtocolError("args must be a JSON object")
    return Request(kind, follow, args)


def tail_args(args: dict[str, Any]) -> TailArgs:
    """``tail``'s arguments checked: a relative file name, a line count, ``wait``."""
    filename = args.get("filename")
    lines = args.get("lines", 10)
    wait = args.get("wait", False)
    if not isinstance(filename, str) or not filename:
        raise LiveProtocolError("tail needs a filename")
    if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
        raise LiveProtocolError("lines must be a whole number >= 0")
    last_partial = args.get("last_partial", True)
    if not isinstance(wait, bool) or not isinstance(last_partial, bool):
        raise LiveProtocolError("wait and last_partial must be true or false")
    return TailArgs(filename, min(lines, MAX_LINES), wait, last_partial)


def answer(status: str, message: Any) -> str:
    return json.dumps({"status": status, "message": message}, ensure_ascii=False)


def success(message: Any) -> str:
    return answer("success", message)


def error(message: str) -> str:
    return answer("error", message)


def invalid(message: str) -> str:
    return answer("invalid", message)


class Cut(str):
    """A line not ended by a newline: a piece of a long line, continued by the next piece,
    or a file's unterminated last line."""

    __slots__ = ()


def lines_answer(lines: list[str]) -> str:
    """A ``tail`` answer: ``lines``, and which of them are ``Cut`` (not ended)."""
    continued = [index for index, line in enumerate(lines) if isinstance(line, Cut)]
    if not continued:
        return success(lines)
    return json.dumps(
        {"status": "success", "message": lines, "continued": continued}, ensure_ascii=False
    )


@dataclass(frozen=True, slots=True)
class Answer:
    ok: bool
    message: Any
    # The lines of ``message`` that its next line continues (taskfs's answering side).
    continued: frozenset[int] = frozenset()


def parse_answer(raw: str | bytes) -> Answer:
    """An answer from a peer; ``LiveProtocolError`` for anything else."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise LiveProtocolError("the task's live channel sent something that is not JSON") from None
    if not isinstance(data, dict) or data.get("status") not in ("success", "invalid", "error"):
        raise LiveProtocolError("the task's live channel sent an answer without a status")
    continued = data.get("continued", [])
    if not isinstance(continued, list) or not all(type(i) is int for i in continued):
        raise LiveProtocolError("the task's live channel sent a bad list of continued lines")
    return Answer(data["status"] == "success", data.get("message"), frozenset(continued))


def text_of(lines: list[str], continued: frozenset[int] = frozenset()) -> str:
    """The text ``lines`` stand for: each ends with a newline, but those ``continued``."""
    return "".join(line if index in continued else f"{line}\n" for index, line in enumerate(lines))


def piece_for(budget: int) -> int:
    """Characters of a line that fit one message of ``budget`` bytes however they escape (a
    character takes at most 6 bytes of JSON)."""
    return max(1, (budget - 64) // 6)


def split_long(line: str, budget: int = MESSAGE_BUDGET) -> Iterator[str]:
    """A line as it is sent: whole when its JSON fits a message of ``budget`` bytes, else in
    the longest pieces that do (at least ``piece_for(budget)`` characters each), every piece
    but the last a ``Cut`` (the last too, if ``line`` is one)."""
    room = budget - 64
    if len(line) <= piece_for(budget) or _json_size(line) <= room:
        yield line
        return
    pos = 0
    while pos < len(line):
        low, high = piece_for(budget), min(len(line) - pos, room)  # a character is >= 1 byte
        while low < high:  # the longest piece from ``pos`` that fits
            mid = (low + high + 1) // 2
            if _json_size(line[pos : pos + mid]) <= room:
                low = mid
            else:
                high = mid - 1
        piece = line[pos : pos + low]
        pos += low
        yield Cut(piece) if pos < len(line) or isinstance(line, Cut) else piece


def _line_cost(line: str, index: int) -> int:
    """Bytes ``line`` adds to a ``lines_answer`` where it is at most at ``index``: its JSON
    and separator, and its index in ``continued`` if it is a ``Cut`` (60 bytes of each
    budget are kept for the braces and keys)."""
    return _json_size(line) + 2 + (len(str(index)) + 2 if isinstance(line, Cut) else 0)


def _json_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode())


def batches(lines: Iterable[str], budget: int = MESSAGE_BUDGET) -> Iterator[list[str]]:
    """``lines`` grouped into answers of at most ``budget`` bytes of JSON each."""
    batch: list[str] = []
    size = 2
    for line in lines:
        for cut in split_long(line, budget):
            cost = _line_cost(cut, len(batch))
            if batch and size + cost > budget - 60:
                yield batch
                batch, size = [], 2
            batch.append(cut)
            size += cost
    if batch:
        yield batch


def last_fitting(lines: list[str], budget: int = MESSAGE_BUDGET) -> list[str]:
    """The last of ``lines`` that fit in one answer (a one-shot ``tail`` sends one message)."""
    pieces = [cut for line in lines for cut in split_long(line, budget)]
    kept: list[str] = []
    size = 2
    for cut in reversed(pieces):
        cost = _line_cost(cut, len(pieces))
        if size + cost > budget - 60:
            break
        kept.append(cut)
        size += cost
    kept.reverse()
    return kept


def fit_text(text: str, budget: int = MESSAGE_BUDGET) -> str:
    """``text`` (``top``'s, say) as a success answer of at most ``budget`` bytes: whole, or
    its first lines and a last one saying how many were left out."""
    if len(success(text).encode()) <= budget:
        return text
    lines = text.splitlines()
    kept: list[str] = []
    size = len(success("").encode()) + 40  # room for the last line
    for line in lines:
        cost = _json_size(line + "\n") - 2
        if size + cost > budget:
            break
        kept.append(line)
        size += cost
    return "\n".join([*kept, f"... ({len(lines) - len(kept)} more lines)"]) + "\n"


def fit_listing(tree: list[Any], budget: int) -> list[Any]:
    """An ``ls`` answer of at most ``budget`` bytes: whole, or cut at the deepest level that
    fits (directories below it listed empty), or, when not even the top level fits, its first
    names."""
    if len(success(tree).encode()) <= budget:
        return tree
    # Bytes each level adds: a name costs its JSON and a separator; a directory, its braces.
    costs: list[int] = []
    level: list[Any] = [tree]
    while level:
        cost, below = 0, []
        for node in level:
            for item in node:
                if isinstance(item, dict):
                    for name, children in item.items():
                        cost += _json_size(name) + 8
                        below.append(children)
                else:
                    cost += _json_size(item) + 2
        costs.append(cost)
        level = below
    room = budget - len(success([]).encode()) - 64
    depth = 0
    while depth < len(costs) and sum(costs[: depth + 1]) <= room:
        depth += 1
    if depth == 0:
        kept, used = [], 0
        for item in tree:
            name = next(iter(item)) if isinstance(item, dict) else item
            used += _json_size(name) + 8
            if used > room:
                break
            kept.append({name: []} if isinstance(item, dict) else item)
        return kept
    return _cut(tree, depth)


def _cut(node: list[Any], depth: int) -> list[Any]:
    if depth <= 1:
        return [{name: [] for name in item} if isinstance(item, dict) else item for item in node]
    return [
        {name: _cut(children, depth - 1) for name, children in item.items()}
        if isinstance(item, dict)
        else item
        for item in node
    ]


def check_name(name: object) -> str:
    """One name of a listing from a peer: a string that is a single path component."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise LiveProtocolError(f"the task's live channel listed a bad name: {name!r}")
    return name


def listing_paths(tree: object) -> list[tuple[str, bool]]:
    """``(path, is_dir)`` for each entry of an ``ls`` answer ``["f", {"d": [...]}, ...]``,
    parents before children; hostile input (bad names, too deep, too many) is refused."""
    out: list[tuple[str, bool]] = []
    stack: list[tuple[str, object, int]] = [("", tree, 0)]
    while stack:
        prefix, node, depth = stack.pop()
        if not isinstance(node, list):
            raise LiveProtocolError("the task's live channel sent a listing that is not a list")
        if depth > MAX_DEPTH:
            raise LiveProtocolError("the task's live channel sent a listing nested too deep")
        for item in node:
            if isinstance(item, dict):
                for name, children in item.items():
                    path = prefix + check_name(name)
                    out.append((path, True))
                    stack.append((path + "/", children, depth + 1))
            else:
                out.append((prefix + check_name(item), False))
            if len(out) > MAX_LISTING:
                raise LiveProtocolError(
                    f"the task's live channel listed more than {MAX_LISTING} entries"
                )
    return out
