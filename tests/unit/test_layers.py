"""The architecture's rules (DESIGN.md section 2), checked on the source itself.

* dependency direction between the packages; the filesystem never imports the server;
  only ``taskfs.live`` imports the optional WebRTC stack;
* only ``fs/fuse_ops.py`` and ``fs/mount.py`` import pyfuse3; only ``api/client.py`` and
  ``archive/rangeio.py`` import httpx; ``archive/zipindex.py`` does no I/O;
* the README's semantics table names exactly the errnos of ``taskfs.errors``.
"""

from __future__ import annotations

import ast
import errno
import re
from pathlib import Path

import pytest

from taskfs import errors

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "taskfs"


def imports(path: Path) -> set[str]:
    """Modules imported at run time (imports under ``if TYPE_CHECKING:`` do not count)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules() -> dict[str, set[str]]:
    return {str(path.relative_to(PACKAGE)): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_only_the_adapter_and_mount_import_pyfuse3() -> None:
    users = {
        name for name, found in modules().items() if any(m.startswith("pyfuse3") for m in found)
    }
    assert users == {"fs/fuse_ops.py", "fs/mount.py"}


def test_only_the_client_and_rangeio_import_httpx() -> None:
    users = {name for name, found in modules().items() if any(m.startswith("httpx") for m in found)}
    assert users == {"api/client.py", "archive/rangeio.py"}


def test_only_the_live_package_imports_the_webrtc_stack() -> None:
    """aiortc is an optional extra: the rest of taskfs imports it only through ``taskfs.live``
    (and the server and CLI import those modules only inside the functions that need them)."""
    users = {
        name
        for name, found in modules().items()
        if any(m.startswith(("aiortc", "aioice")) for m in found)
    }
    assert users == {"live/answerer.py", "live/client.py", "live/rtc.py"}


def test_zipindex_does_no_io() -> None:
    found = modules()["archive/zipindex.py"]
    assert not found & {"os", "io", "socket", "pathlib", "trio", "httpx", "shutil", "tempfile"}


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("server/", {"taskfs.fs", "taskfs.archive", "taskfs.api.client", "taskfs.outputs"}),
        ("fs/", {"taskfs.server"}),
        ("archive/", {"taskfs.fs", "taskfs.server", "taskfs.api", "taskfs.outputs"}),
        ("api/", {"taskfs.fs", "taskfs.server", "taskfs.archive", "taskfs.outputs"}),
        ("live/", {"taskfs.fs", "taskfs.server", "taskfs.archive", "taskfs.outputs"}),
        ("live/protocol.py", {"taskfs", "os", "trio", "asyncio", "aiortc"}),
        ("errors.py", {"taskfs"}),
        ("api/models.py", {"taskfs"}),
    ],
)
def test_dependency_direction(package: str, forbidden: set[str]) -> None:
    for name, found in modules().items():
        if name.startswith(package):
            bad = {m for m in found for f in forbidden if m == f or m.startswith(f + ".")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_config_is_a_leaf() -> None:
    found = {m for m in modules()["config.py"] if m.startswith("taskfs")}
    assert found <= {"taskfs.errors"}


def test_packing_is_a_leaf_shared_by_submit_and_the_service() -> None:
    """One packing module for inputs and outputs: it imports nothing of taskfs but the mount
    table (a leaf of the standard library), and both sides use it."""
    found = modules()
    assert {m for m in found["packing.py"] if m.startswith("taskfs")} <= {"taskfs.mounts"}
    assert not {m for m in found["mounts.py"] if m.startswith("taskfs")}
    assert "taskfs.packing" in found["api/submit.py"]
    assert "taskfs.packing" in found["server/storage.py"]


def test_the_task_supervisor_needs_only_the_standard_library() -> None:
    """``server/reaper.py`` runs as ``python -I -S``: no site-packages, no taskfs."""
    stdlib = {"__future__", "contextlib", "ctypes", "os", "select", "signal", "sys", "time"}
    assert modules()["server/reaper.py"] <= stdlib


def test_readme_errno_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Errors (the semantics table)", 1)[1].split("\n\n", 2)[1]
    in_readme = set(re.findall(r"\bE[A-Z]{2,}\b", table))
    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.TaskfsError)
    ]
    local = (errors.UsageError, errors.LocalError)  # the CLI's and the library's, not the mount's
    in_code = {errno.errorcode[c.errno] for c in classes if c not in local}
    assert in_readme == in_code
