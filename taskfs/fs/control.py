"""The ``control`` file: its grammar and what each command does.

Owns: parsing what is written to ``control`` and carrying the command out through the API.

Grammar: one command per line; surrounding whitespace and the newline are ignored; the only
command is ``kill``. Reading ``control`` lists the accepted commands (``HELP``).

Must stay true:
* a write is validated and acted on in the ``write`` call itself (``echo kill > control``
  arrives as ``open(O_TRUNC)`` + ``write``; errors raised at ``release`` are thrown away by the
  kernel, and taskfs answers no ``flush`` at all), and returns only after the API acknowledged
  the command;
* each write holds whole commands: a write with anything that is not a command is
  ``InvalidCommandError`` (EINVAL) and nothing of it is sent;
* ``kill`` on a task that has already ended is ``TaskEndedError`` (ESRCH); on a task whose kill
  is accepted or already pending it succeeds.
"""

from __future__ import annotations

import logging

from taskfs.api.client import ApiClient
from taskfs.api.models import TaskStatusCode
from taskfs.errors import InvalidCommandError

log = logging.getLogger(__name__)

COMMANDS = ("kill",)
HELP = "".join(f"{c}\n" for c in COMMANDS)


def parse(text: str) -> list[str]:
    """The commands in one write: one per line, surrounding whitespace and newline ignored.

    Raises ``InvalidCommandError`` if any line is not a command (then none is carried out).
    """
    commands = [word for word in (line.strip() for line in text.splitlines()) if word]
    for word in commands:
        if word not in COMMANDS:
            raise InvalidCommandError(f"unknown control command {word!r}")
    return commands


async def kill(api: ApiClient, task_id: str) -> TaskStatusCode:
    """Ask the API to kill ``task_id``; ``TaskEndedError`` if it had already ended."""
    status = await api.kill_running(task_id)
    log.info("kill of task %s accepted (%s)", task_id, status)
    return status


async def run(api: ApiClient, task_id: str, command: str) -> None:
    if command == "kill":
        await kill(api, task_id)
    else:  # pragma: no cover - parse() admits only COMMANDS
        raise InvalidCommandError(command)
