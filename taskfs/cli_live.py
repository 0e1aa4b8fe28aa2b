"""``taskfs tasks tail/list-files/top/last-modified-file`` and ``taskfs logs``: a computing
task's files over the service's live channel, under the official CLI's names.

Owns: the arguments and the printing of the live commands (``taskfs.live.ops`` does the
work). Output is plain text for pipes: ``tail`` prints the file's lines as they are (GNU
``tail``'s ``==> name <==`` headers when there are several files), where the official CLI
decorates each line with a box.

Must stay true: these commands need the ``live`` extra (aiortc) and say so when it is
missing; a file that fails is one line on stderr and exit status 1, the others go on; a line
of one file is never cut by another file's header (``Printer``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import trio

from taskfs.api.client import ApiClient
from taskfs.cli_tasks import settings_of, zero_or_more_arg
from taskfs.errors import LiveError
from taskfs.live import load_ops
from taskfs.task import run_api


class Printer:
    """Lines of several files on ``out``, with a header whenever the file changes.

    A line longer than one message of the live channel arrives in pieces (each marked as
    continued), and another file's answer may come between two of them: its header would
    cut the line in two. So while a file's line is open (its text so far does not end with a
    newline), the others' text waits until that line ends, or no piece of it came for
    ``HOLD`` seconds (a file's last line without a newline stays open until more comes), or
    it has been open for ``MAX_HOLD`` (a progress bar drawn with carriage returns); ``tick``
    lets it go."""

    HOLD = 0.5
    MAX_HOLD = 5.0

    def __init__(self, names: Sequence[str], out: TextIO | None = None) -> None:
        self.headers = len(names) > 1
        self.out = out or sys.stdout
        self.current: str | None = None
        # When the current file's line was left open, and when its last piece came.
        self.open_since: float | None = None
        self.last_piece = 0.0
        self.waiting: list[tuple[str, str]] = []

    def text(self, name: str, text: str) -> None:
        if self.open_since is not None and name != self.current:
            self.waiting.append((name, text))
            return
        self._write(name, text)
        self._release()

    def tick(self, now: float) -> None:
        """Let the others' text go once the open line has waited long enough."""
        if self.open_since is None:
            return
        if now - self.last_piece >= self.HOLD or now - self.open_since >= self.MAX_HOLD:
            self.open_since = None
            self._release()

    def finish(self) -> None:
        self.open_since = None
        self._release()

    def _release(self) -> None:
        while self.waiting and self.open_since is None:
            self._write(*self.waiting.pop(0))

    def _write(self, name: str, text: str) -> None:
        if not text and not (self.headers and self.current is None):
            return
        if self.headers and name != self.current:
            self.out.write(f"{'' if self.current is None else chr(10)}==> {name} <==\n")
            self.current = name
        self.out.write(text)
        self.out.flush()
        if text:
            self.last_piece = time.monotonic()
            ends = text.endswith("\n")
            self.open_since = None if ends else (self.open_since or self.last_piece)

    @staticmethod
    def error(name: str, exc: LiveError) -> None:
        # The answering side's reasons may name the file already ("File not found: x").
        said = str(exc).removesuffix(f": {name}")
        print(f"taskfs: {name}: {said}", file=sys.stderr, flush=True)


def _tail(args: argparse.Namespace, names: list[str], lines: int, follow: bool) -> int:
    ops = load_ops()
    printer = Printer(names)

    async def run(api: ApiClient) -> int:
        async with trio.open_nursery() as nursery:

            async def ticks() -> None:
                while True:
                    await trio.sleep(0.1)
                    printer.tick(time.monotonic())

            nursery.start_soon(ticks)
            try:
                failed: int = await ops.tail(
                    api,
                    args.id,
                    names,
                    lines=lines,
                    follow=follow,
                    on_text=printer.text,
                    on_error=printer.error,
                    wait=args.wait,
                )
            finally:
                printer.finish()
                nursery.cancel_scope.cancel()
        return failed

    return 1 if run_api(settings_of(args), run) else 0


def cmd_tail(args: argparse.Namespace) -> int:
    # A file named twice is followed once (one stream, one header).
    return _tail(args, list(dict.fromkeys(args.filename)), args.lines, args.follow)


def cmd_logs(args: argparse.Namespace) -> int:
    names = ["stdout.txt", "stderr.txt"]
    if args.stdout != args.stderr:
        names = ["stdout.txt"] if args.stdout else ["stderr.txt"]
    return _tail(args, names, args.lines, True)


def _once(args: argparse.Namespace, kind: str, show: Callable[[Any], str]) -> int:
    ops = load_ops()

    async def run(api: ApiClient) -> Any:
        return await ops.once(api, args.id, kind)

    answer = run_api(settings_of(args), run)
    sys.stdout.write(json.dumps(answer, indent=2) + "\n" if args.json else show(answer))
    return 0


def cmd_list_files(args: argparse.Namespace) -> int:
    return _once(args, "ls", lambda tree: load_ops().format_listing(tree))


def cmd_top(args: argparse.Namespace) -> int:
    return _once(args, "top", lambda text: str(text) if str(text).endswith("\n") else f"{text}\n")


def cmd_last_modified(args: argparse.Namespace) -> int:
    return _once(args, "last_modified_file", lambda answer: load_ops().format_last_modified(answer))


LIVE_NOTE = (
    " Works while the task computes, over the service's live channel (WebRTC, through aiortc)."
)


def add_task_parsers(
    leaf: Callable[[str, str, str], argparse.ArgumentParser], task_id: Callable[[str], str]
) -> None:
    """``tasks tail``, ``list-files``, ``top``, ``last-modified-file``."""
    p = leaf(
        "tail",
        "the last lines of a running task's files (-f: follow them)",
        "Print the last --lines lines of each FILE (relative to the task's working "
        "directory, e.g. stdout.txt); with -f, keep printing new lines until the task stops "
        "computing." + LIVE_NOTE,
    )
    p.add_argument("id", type=task_id, metavar="ID")
    p.add_argument("filename", nargs="+", metavar="FILE")
    p.add_argument("-l", "--lines", type=zero_or_more_arg, default=10, help="default: %(default)s")
    p.add_argument("-f", "--follow", action="store_true", help="print new lines as they come")
    p.add_argument("--wait", action="store_true", help="wait for a FILE that does not exist yet")
    p.set_defaults(func=cmd_tail, json=False)

    p = leaf(
        "list-files",
        "the files of a running task now",
        "One path per line, directories ending in '/'." + LIVE_NOTE,
    )
    p.add_argument("id", type=task_id, metavar="ID")
    p.add_argument("--json", action="store_true", help="the protocol's nested listing")
    p.set_defaults(func=cmd_list_files)

    p = leaf(
        "top",
        "'top -b -H -n 1' on the machine running the task",
        "A snapshot of the processes and threads of the task's machine." + LIVE_NOTE,
    )
    p.add_argument("id", type=task_id, metavar="ID")
    p.set_defaults(func=cmd_top, json=False)

    p = leaf(
        "last-modified-file",
        "the running task's most recently modified file",
        "Its name, when it was modified and how long ago." + LIVE_NOTE,
    )
    p.add_argument("id", type=task_id, metavar="ID")
    p.add_argument("--json", action="store_true", help="the protocol's answer as JSON")
    p.set_defaults(func=cmd_last_modified)


def add_logs_parser(
    sub: argparse._SubParsersAction[Any],
    add_api_options: Callable[[argparse.ArgumentParser], None],
    task_id: Callable[[str], str],
) -> None:
    p = sub.add_parser(
        "logs",
        help="follow a running task's stdout and stderr",
        description="Follow the task's stdout.txt and stderr.txt (one of them with --stdout "
        "or --stderr) until it stops computing, as 'inductiva logs' does." + LIVE_NOTE,
    )
    p.add_argument("id", type=task_id, metavar="ID")
    p.add_argument("--stdout", action="store_true", help="only stdout.txt")
    p.add_argument("--stderr", action="store_true", help="only stderr.txt")
    p.add_argument("-l", "--lines", type=zero_or_more_arg, default=10, help="default: %(default)s")
    p.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    add_api_options(p)
    p.set_defaults(func=cmd_logs, wait=True, json=False)
