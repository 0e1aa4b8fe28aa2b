"""taskfs: a remote compute task service as a filesystem.

The package is layered (see ``DESIGN.md`` section 2): ``api`` speaks the REST API, ``archive``
reads output ZIPs over HTTP ranges, ``fs`` is the filesystem, ``server`` the embedded local
service, ``cli`` the ``taskfs`` command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Task", "TaskStatusCode", "__version__"]

if TYPE_CHECKING:
    from taskfs.api.models import TaskStatusCode
    from taskfs.task import Task


def __getattr__(name: str) -> Any:
    """``from taskfs import Task`` without importing the client for ``taskfs --version``."""
    if name == "Task":
        from taskfs.task import Task

        return Task
    if name == "TaskStatusCode":
        from taskfs.api.models import TaskStatusCode

        return TaskStatusCode
    raise AttributeError(name)
