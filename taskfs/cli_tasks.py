"""``taskfs tasks ...``: list, info, kill, outputs, download, wait.

Owns: the subcommands people who know the official CLI expect, with stable parseable output
(``--json``) for scripts, the kill confirmation prompt, progress display for downloads, and
Ctrl-C handling for ``wait --kill-on-interrupt``.

Must stay true: without ``-y`` nothing is killed unless a person at a terminal said yes; one
task failing does not stop the others and shows in the exit status; errors are one line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from taskfs.api.client import ApiClient
from taskfs.api.models import (
    KILLABLE,
    Task,
    TaskStatus,
    TaskStatusCode,
    computation_time,
    is_task_id,
    machine_type,
)
from taskfs.config import ClientSettings, resolve_client
from taskfs.errors import NotFoundError, ServiceError, TaskEndedError, UsageError
from taskfs.outputs import download, format_bytes, output_info
from taskfs.task import output_root, outputs_below, run_api

YES = ("y", "ye", "yes")
MANY = 5


def settings_of(args: argparse.Namespace) -> ClientSettings:
    """Which API and key (``--api-url``/``--api-key-file``/``--data-dir``, ``--deadline``)."""
    settings = resolve_client(args.api_url, args.api_key_file, args.data_dir)
    if args.deadline is not None:
        settings = replace(
            settings, deadline=args.deadline, read_timeout=min(settings.read_timeout, args.deadline)
        )
    return settings


def task_id_arg(value: str) -> str:
    """An argparse type: a task id, checked as the mount checks names (``UsageError``)."""
    if not is_task_id(value):
        raise argparse.ArgumentTypeError(
            f"not a task id: {value!r} (letters, digits, '_' and '-', 1-64 of them)"
        )
    return value


def path_arg(text: str) -> Path:
    """An argparse type: a path, made absolute where it was given (the background processes
    that get it do not stay in the directory the user was in)."""
    return Path(text).absolute()


def seconds_arg(text: str) -> float:
    """An argparse type: a finite, positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def grace_arg(text: str) -> float:
    """An argparse type: a finite number of seconds, zero allowed."""
    return 0.0 if text.strip() in ("0", "0.0") else seconds_arg(text)


def whole_number(text: str, minimum: int) -> int:
    """``text`` as a whole number of at least ``minimum`` (argparse's error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text!r}")
    return value


def count_arg(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return whole_number(text, 1)


def zero_or_more_arg(text: str) -> int:
    """An argparse type: a whole number of at least 0 (lines, a user or group id)."""
    return whole_number(text, 0)


def port_arg(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0-65535): {text!r}")
    return value


def _time(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def summary(task: Task) -> dict[str, Any]:
    """The stable per-task record of ``list --json``."""
    return {
        "task_id": task.task_id,
        "status": str(task.status),
        "status_alias": task.status_alias,
        "project": task.project,
        "simulator": task.simulator,
        "is_terminated": task.is_terminated,
        "submitted": task.input_submit_time.isoformat() if task.input_submit_time else None,
        "started": task.start_time.isoformat() if task.start_time else None,
        "ended": task.end_time.isoformat() if task.end_time else None,
        "computation_time": computation_time(task) or None,
        "machine_type": machine_type(task) or None,
    }


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _status(value: str | None) -> TaskStatusCode | None:
    if value is None:
        return None
    try:
        return TaskStatusCode(value)
    except ValueError:
        valid = ", ".join(s.value for s in TaskStatusCode)
        raise UsageError(f"unknown status {value!r} (one of: {valid})") from None


# -- list / info ---------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    if args.n is not None and args.n < 1:
        raise UsageError("-n must be at least 1")
    status = _status(args.status)
    limit = None if args.all else (args.n or 10)

    async def fetch(api: ApiClient) -> list[Task]:
        per_page = 500 if limit is None else min(500, limit)
        return [t async for t in api.iter_tasks(status, args.project, per_page, limit)]

    tasks = run_api(settings_of(args), fetch)
    if args.json:
        print(json.dumps([summary(t) for t in tasks], indent=2))
        return 0
    if not tasks:
        print("No tasks found.")
        return 0
    rows = [["ID", "STATUS", "SUBMITTED", "STARTED", "COMPUTATION", "MACHINE"]]
    rows += [
        [
            t.task_id,
            str(t.status),
            _time(t.input_submit_time),
            _time(t.start_time),
            computation_time(t) or "-",
            machine_type(t) or "-",
        ]
        for t in tasks
    ]
    print(table(rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    task, raw = run_api(settings_of(args), lambda api: api.get_task_raw(args.id))
    if args.json:
        print(json.dumps(json.loads(raw), indent=2))
        return 0
    fields = [
        ("status", f"{task.status} ({task.status_alias})"),
        ("project", task.project or "-"),
        ("simulator", task.simulator),
        ("machine type", machine_type(task) or "-"),
        ("computation time", computation_time(task) or "-"),
        ("created", _time(task.create_time)),
        ("submitted", _time(task.input_submit_time)),
        ("started", _time(task.start_time)),
        ("ended", _time(task.end_time)),
        ("outputs", task.storage_output_path or "-"),
    ]
    if task.error_detail:
        fields.append(("error", task.error_detail))
    print(f"Task {task.task_id}")
    for name, value in fields:
        print(f"  {name:<18}{value}")
    print("Timeline:")
    for entry in task.status_history:
        took = ""
        if entry.end_timestamp is not None:
            took = f"{(entry.end_timestamp - entry.timestamp).total_seconds():.2f} s"
        print(
            f"  {_time(entry.timestamp)}  {entry.status:<22}{took:>11}  {entry.description or ''}"
        )
        for op in entry.operations:
            command = op.attributes.get("command")
            detail = f" {command}" if command else ""
            print(f"  {'':19}  - {op.name}{detail} [{op.status}]")
    return 0


# -- kill ----------------------------------------------------------------------------------------


def refusal(ids: Sequence[str]) -> str | None:
    """Ask at the terminal: None if the answer is yes, else why nothing is to be killed (no
    terminal means no, said in one line: there is no one to show the list to)."""
    if sys.stdin is None or not sys.stdin.isatty():
        many = f"{len(ids)} tasks" if len(ids) > 1 else f"task {ids[0]}"
        return (
            f"taskfs: error: no terminal to confirm the kill of {many} on: nothing killed "
            "(use -y to kill without asking)"
        )
    if len(ids) > MANY:
        print(f"You are about to kill {len(ids)} task(s).")
    else:
        print("You are about to kill the following tasks:")
        for task_id in ids:
            print(f"  - {task_id}")
    try:
        answer = input("Are you sure you want to proceed (y/[N])? ")
    except EOFError:
        answer = ""
    return None if answer.strip().lower() in YES else "Aborted: nothing killed."


def cmd_kill(args: argparse.Namespace) -> int:
    if args.all and args.ids:
        raise UsageError("give task ids or --all, not both")
    if not args.all and not args.ids:
        raise UsageError("give the ids of the tasks to kill, or --all")
    settings = settings_of(args)
    ids: list[str] = list(dict.fromkeys(args.ids))
    if args.all:

        async def killable(api: ApiClient) -> list[str]:
            found: list[str] = []
            for status in sorted(KILLABLE):
                found += [t.task_id async for t in api.iter_tasks(status)]
            return found

        ids = run_api(settings, killable)
        if not ids:
            print("No queued or running tasks to kill.")
            return 0
    refused = None if args.yes else refusal(ids)
    if refused is not None:
        print(refused, file=sys.stderr)
        return 1

    async def kill_all(api: ApiClient) -> int:
        failures = 0
        killed: list[str] = []
        for task_id in ids:
            try:
                await api.kill_running(task_id)
            except (TaskEndedError, NotFoundError) as exc:
                print(f"Task {task_id}: {exc}; not killed.", file=sys.stderr)
                failures += 1
                continue
            print(f"Successfully sent kill request for task {task_id}.")
            killed.append(task_id)
        if args.wait is not None:
            for task_id in killed:
                with trio.move_on_after(args.wait):
                    status = (await api.wait_ended(task_id, poll=0.5)).status
                    if status == TaskStatusCode.KILLED:
                        print(f"Task {task_id} killed.")
                    else:
                        print(f"Task {task_id} ended {status}, not killed.", file=sys.stderr)
                        failures += 1
                    continue
                print(f"Task {task_id} is not killed after {args.wait:g} s.", file=sys.stderr)
                failures += 1
        return failures

    return 0 if run_api(settings, kill_all) == 0 else 1


# -- outputs / download --------------------------------------------------------------------------


def cmd_outputs(args: argparse.Namespace) -> int:
    async def fetch(api: ApiClient) -> str:
        return str(await output_info(api, await api.get_task(args.id)))

    print(run_api(settings_of(args), fetch))
    return 0


# How often the per-file lines of a download reach a pipe (seconds).
FLUSH_EVERY = 0.2


def cmd_download(args: argparse.Namespace) -> int:
    if args.dir is not None and not args.dir.strip():
        raise UsageError("--dir is empty (leave it out for the default)")
    root = Path(args.dir) if args.dir is not None else output_root()
    below = outputs_below(args.id)
    dest = root.joinpath(*below)
    interactive = sys.stderr.isatty()

    async def fetch(api: ApiClient) -> tuple[int, int]:
        task = await api.get_task(args.id)
        if not task.is_terminated:
            raise UsageError(f"task {args.id} has not ended ({task.status}): no outputs yet")
        from tqdm import tqdm  # noqa: PLC0415 - 10 ms of imports, for this command alone

        bar = tqdm(unit="B", unit_scale=True, disable=not interactive, desc=args.id[:12])

        def on_start(total: int) -> None:
            bar.reset(total=total)

        def on_chunk(name: str, size: int) -> None:
            bar.update(size)

        total = 0
        flushed = time.monotonic()

        def on_file(name: str, size: int) -> None:
            # A line per file where no bar is shown, flushed a few times a second (not per
            # file: 20,000 files were 20,000 writes, 6% of the command's time).
            nonlocal total, flushed
            total += size
            if not interactive:
                print(f"downloaded {name} ({format_bytes(size)})")
                now = time.monotonic()
                if now - flushed >= FLUSH_EVERY:
                    sys.stdout.flush()
                    flushed = now

        try:
            names = await download(
                api,
                task,
                root,
                args.files,
                on_chunk,
                on_file=on_file,
                on_start=on_start,
                below=below,
            )
        finally:
            bar.close()
            sys.stdout.flush()
        return len(names), total

    count, size = run_api(settings_of(args), fetch)
    print(f"Downloaded {count} file(s), {format_bytes(size)}, to {dest}")
    return 0


# -- wait ----------------------------------------------------------------------------------------


def cmd_wait(args: argparse.Namespace) -> int:
    def outage(error: ServiceError, retry_in: float) -> None:
        print(f"taskfs: {error}; retrying in {retry_in:g} s", file=sys.stderr, flush=True)

    settings = _settings_riding_out(args, outage)

    def show(status: TaskStatus) -> None:
        now = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        ahead = ""
        if status.position_in_queue is not None:
            ahead = f" ({status.position_in_queue.tasks_ahead} ahead in the queue)"
        print(f"{now}  {status.status}{ahead}", flush=True)

    async def watch(api: ApiClient) -> TaskStatusCode:
        status = await api.wait_ended(
            args.id, args.poll, show, max_outage=args.max_outage, on_outage=outage
        )
        return status.status

    try:
        final = run_api(settings, watch)
    except KeyboardInterrupt:
        if not args.kill_on_interrupt:
            print("Interrupted; the task keeps running.", file=sys.stderr)
            return 130
        try:
            run_api(settings, lambda api: api.kill_running(args.id))
        except TaskEndedError:
            print("Interrupted; the task had already ended.", file=sys.stderr)
            return 130
        print(f"Interrupted: killed task {args.id}.", file=sys.stderr)
        return 130
    return 0 if final == TaskStatusCode.SUCCESS else 1


def _settings_riding_out(
    args: argparse.Namespace, outage: Callable[[ServiceError, float], None]
) -> ClientSettings:
    """``settings_of``, waiting up to ``--max-outage`` for a local service that is not running
    (being restarted, say) as ``wait_ended`` waits for one that does not answer."""
    started = time.monotonic()
    backoff = 1.0
    while True:
        try:
            return settings_of(args)
        except ServiceError as exc:
            spent = time.monotonic() - started
            if spent >= args.max_outage:
                raise ServiceError(f"{exc} (for {spent:.0f} s; gave up)") from exc
            backoff = min(backoff, args.max_outage - spent)
            outage(exc, backoff)
            time.sleep(backoff)
            backoff = min(30.0, backoff * 2)


# -- the parser ----------------------------------------------------------------------------------


def add_parsers(
    sub: argparse._SubParsersAction[Any], add_api_options: Any, parser_class: type
) -> None:
    tasks = sub.add_parser(
        "tasks",
        help="list, inspect, kill, wait for tasks; list and download outputs; tail running ones",
        description="Work with the tasks of the service (the same one 'taskfs mount' uses).",
    )
    commands = tasks.add_subparsers(
        dest="tasks_command", metavar="COMMAND", required=True, parser_class=parser_class
    )

    def leaf(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name, help=help_text, description=description
        )
        parser.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
        add_api_options(parser)
        return parser

    p = leaf(
        "list",
        "list tasks, newest first",
        "A table of id, status, submitted, started, computation time and machine type.",
    )
    count = p.add_mutually_exclusive_group()
    count.add_argument("-n", type=count_arg, help="the newest N tasks (default 10)")
    count.add_argument("--all", action="store_true", help="every task")
    p.add_argument("--status", help="only tasks in this status, e.g. computation-started")
    p.add_argument("--project", help="only tasks of this project")
    p.add_argument("--json", action="store_true", help="a JSON list (stable fields) instead")
    p.set_defaults(func=cmd_list)

    p = leaf(
        "info",
        "one task's record and status timeline",
        "The task's fields and the timeline of its statuses and operations.",
    )
    p.add_argument("id", type=task_id_arg)
    p.add_argument("--json", action="store_true", help="the API's full record as JSON")
    p.set_defaults(func=cmd_info)

    p = leaf(
        "kill",
        "kill tasks",
        "Kill tasks. Asks for confirmation at a terminal unless -y; with no terminal and "
        "no -y nothing is killed. The exit status is 0 only if every kill succeeded.",
    )
    p.add_argument("ids", nargs="*", metavar="ID", type=task_id_arg)
    p.add_argument("--all", action="store_true", help="every queued or running task")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    p.add_argument(
        "--wait",
        type=seconds_arg,
        metavar="SECONDS",
        help="wait up to SECONDS for each task to be killed",
    )
    p.set_defaults(func=cmd_kill)

    p = leaf(
        "outputs",
        "list the outputs archive (no download)",
        "The outputs archive's contents, read from its central directory with range requests.",
    )
    p.add_argument("id", type=task_id_arg)
    p.set_defaults(func=cmd_outputs)

    p = leaf(
        "download",
        "download outputs (all or some files)",
        "Download the outputs with range requests into DIR/<id>/outputs (default DIR: "
        "$INDUCTIVA_OUTPUT_DIR, else inductiva_output), with a progress bar on a terminal "
        "and one line per file otherwise.",
    )
    p.add_argument("id", type=task_id_arg)
    p.add_argument("--files", nargs="+", metavar="F", help="only these files (relative names)")
    p.add_argument("--dir", help="where to put <id>/outputs")
    p.set_defaults(func=cmd_download)

    p = leaf(
        "wait",
        "wait for a task to end, printing each status change",
        "Prints each status change until the task ends. Exit status 0 if it succeeded, 1 if "
        "it ended any other way, 69 if the service stayed unreachable for --max-outage.",
    )
    p.add_argument("id", type=task_id_arg)
    p.add_argument(
        "--kill-on-interrupt",
        action="store_true",
        help="Ctrl-C kills the task (as Task.sync_context does)",
    )
    p.add_argument(
        "--max-outage",
        type=seconds_arg,
        default=600.0,
        metavar="SECONDS",
        help="ride out a service outage this long (retrying, saying so on stderr), then give "
        "up with exit status 69 (default: %(default)g)",
    )
    p.add_argument("--poll", type=seconds_arg, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_wait)

    from taskfs.cli_live import add_task_parsers  # noqa: PLC0415 - cli_live imports this module

    add_task_parsers(leaf, task_id_arg)
